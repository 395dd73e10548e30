"""`python -m visiontune`, which is what `torchrun -m visiontune train CFG` runs on each rank."""

from visiontune.cli import main

main()

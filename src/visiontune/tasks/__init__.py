"""Tasks: each implements visiontune.task.Task for one kind of problem."""

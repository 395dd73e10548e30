"""TerraMind through terratorch: the real model where terratorch imports, clear errors everywhere.

terratorch needs torchvision and timm; PyPI's torchvision wheels are built against CUDA torch
and do not import with the CPU torch of our CI machines, so the model tests are skipped there.
"""

from __future__ import annotations

import pytest
import torch

from visiontune.config.schema import LoraConfig
from visiontune.errors import ConfigError
from visiontune.models.lora import resolve_targets, trainable_report, wrap_lora
from visiontune.models.terramind import _default_band_counts, build


def _terratorch_problem() -> str | None:
    """Why terratorch cannot be used here, or None when it can."""
    try:
        import terratorch.registry  # noqa: F401
    except Exception as error:  # torchvision built for a CUDA torch raises RuntimeError
        return f"terratorch does not import here ({type(error).__name__}: {error})"
    return None


TERRATORCH_PROBLEM = _terratorch_problem()
needs_terratorch = pytest.mark.skipif(
    TERRATORCH_PROBLEM is not None, reason=str(TERRATORCH_PROBLEM)
)


def test_generation_models_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="samples tokens.*no gradient.*_encdec"):
        build("terramind_v1_base_generate", modalities=["S1RTC"])


def test_band_counts_of_pretrained_and_new_modalities() -> None:
    assert _default_band_counts(["S1RTC", "S2L2A", "sen2l1c", "RGB", "DEM"]) == [2, 12, 13, 3, 1]
    assert _default_band_counts([{"SAR_HH": 1}, "S1GRD"]) == [1, 2]
    with pytest.raises(ConfigError, match="no default band count for 'LULC'"):
        _default_band_counts(["LULC"])
    with pytest.raises(ConfigError, match="band_counts: \\[2\\] has 1 entries"):
        build(modalities=["S1RTC", "DEM"], band_counts=[2])


@pytest.mark.skipif(TERRATORCH_PROBLEM is None, reason="terratorch imports here")
def test_missing_terratorch_names_the_extra() -> None:
    with pytest.raises(ConfigError, match=r"visiontune\[terratorch\].*importing terratorch failed"):
        build("terramind_v1_tiny", modalities=["S1RTC"])


@pytest.mark.terratorch
@needs_terratorch
def test_random_tiny_terramind_translates_sar_and_takes_lora() -> None:
    """terramind_v1_tiny with random weights: S1RTC in, 3 bands out, LoRA on the fused qkv."""
    torch.manual_seed(0)
    model = build("terramind_v1_tiny", modalities=["S1RTC"], out_channels=3, img_size=64)
    source = torch.randn(2, 2, 64, 64)
    out = model(source)
    assert out.shape == (2, 3, 64, 64)
    targets = resolve_targets(model, "re:.*encoder\\.\\d+\\.attn\\.qkv$")
    assert len(targets) == 12  # one fused qkv per encoder block of the tiny model
    lora = wrap_lora(model, LoraConfig(rank=4, targets="qv"), targets, ["head"])
    rows = {row.component: row for row in trainable_report(lora)}
    assert rows["head"].trainable == rows["head"].total == 192 * 3 * 256 + 3 * 256
    lora(source).square().mean().backward()
    grads = [n for n, p in lora.named_parameters() if p.requires_grad and p.grad is not None]
    assert any("lora_B" in n for n in grads) and any("head" in n for n in grads)


@pytest.mark.terratorch
@needs_terratorch
def test_random_base_encdec_decoder_attends_to_the_sar_through_cross_attention() -> None:
    """terramind_v1_base_encdec (terratorch's tiny/small _encdec do not build): LoRA on the
    decoder's cross_attn.q/kv/proj, as the user does. 32 px keeps the 24 blocks cheap."""
    torch.manual_seed(0)
    model = build("terramind_v1_base_encdec", modalities=["S1RTC"], out_channels=3, img_size=32)
    source = torch.randn(2, 2, 32, 32)
    out = model(source)
    assert out.shape == (2, 3, 32, 32)
    # the output depends on the source only through the decoder's cross-attention
    assert not torch.allclose(model(source.flip(-1)), out)
    targets = resolve_targets(model, "re:.*cross_attn\\.(q|kv|proj)$")
    assert len(targets) == 3 * len(model.terramind.decoder)
    lora = wrap_lora(model, LoraConfig(rank=4, targets="qv"), targets, ["head"])
    lora(source).square().mean().backward()
    trained = {n for n, p in lora.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("cross_attn.kv.lora_B" in n for n in trained)
    assert not any(".attn.qkv" in n for n in trained)  # the encoder stays frozen


@pytest.mark.terratorch
@needs_terratorch
@pytest.mark.parametrize("name", ["terramind_v1_tiny", "terramind_v1_base_encdec"])
def test_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    """Frozen TerraMind (as under LoRA): the gradient reaching the source passes every block."""
    torch.manual_seed(0)
    model = build(name, modalities=["S1RTC"], out_channels=1, img_size=32)
    model.terramind.requires_grad_(False)
    source = torch.randn(1, 2, 32, 32, requires_grad=True)
    (plain,) = torch.autograd.grad(model(source).sum(), source)
    model.set_grad_checkpointing(True)
    calls: list[int] = []
    model.blocks()[-1].norm1.register_forward_hook(lambda *_: calls.append(1))
    (again,) = torch.autograd.grad(model(source).sum(), source)
    assert len(calls) == 2  # the last block ran forward, then again (from its start) in backward
    assert plain.abs().sum() > 0
    assert torch.allclose(plain, again, atol=1e-6)


@pytest.mark.terratorch
@needs_terratorch
def test_unknown_name_lists_the_terramind_encoders() -> None:
    with pytest.raises(
        ConfigError, match="'terramind_v2_tiny' is not in.*terramind_v1_tiny_encdec"
    ):
        build("terramind_v2_tiny", modalities=["S1RTC"])

"""The benchmark's A1111 engine is what the WebUI runs (ldm names, the adapter's wrappers and
hooks, A1111's batch layout), and the benchmark command runs end to end on CPU."""

import json
from dataclasses import replace

import pytest
import torch

from benchmarks.bench import FAM, main
from benchmarks.engines import A1111Engine
from benchmarks.ldm import LDM_CPU, LdmUNet
from fam.hosts.a1111 import Attn1Hook
from fam.layers import discover

TINY = {arch: replace(cfg, channels=16, groups=8, context_dim=16, native=16,
                      adm_dim=cfg.adm_dim and 16 + 48)
        for arch, cfg in LDM_CPU.items()}


@pytest.mark.parametrize("arch, blocks, per_block", [("sd15", (3, 4, 5), 1), ("sdxl", (0, 1, 2), 3)])
def test_ldm_unet_has_the_webui_module_names(arch, blocks, per_block):
    layout = discover(LdmUNet(TINY[arch]))
    layers = layout.am_layers()
    assert layout.naming == "ldm" and {l.index for l in layers} == set(blocks)
    assert len(layers) == len(blocks) * per_block
    assert layers[0].name == f"output_blocks.{blocks[0]}.1.transformer_blocks.0.attn1"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_a1111_engine_runs_fam_through_the_adapter_and_removes_it(arch):
    eng = A1111Engine(arch, "cpu", batch=2, cfg=TINY[arch])
    plain = eng.run(2, 2, None)
    assert plain is None
    run = eng.run(2, 2, FAM)
    layers = eng.layout.am_layers()
    assert run.fm_calls == 2 and run.am_calls == 2 * len(layers) and not run.am_skipped
    rows = 4                                           # 2 images: cond rows, then uncond rows
    tokens = (16 // 4) ** 2
    assert run.stats["record_bytes"] == 2 * sum(rows * tokens * l.module.to_q.in_features * 4
                                                for l in layers)
    assert run.memory.allocated_bytes == 0
    assert not any(isinstance(m.__dict__.get("forward"), Attn1Hook) for m in eng.unet.modules())


def test_a1111_engine_with_fam_effects_off_is_plain():
    eng = A1111Engine("sd15", "cpu", cfg=TINY["sd15"])
    outs = []
    for params in (None, FAM.replace(fm_enabled=False, am_enabled=False), FAM):
        torch.manual_seed(0)
        seen = []
        real = eng.unet.forward
        eng.unet.forward = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
        try:
            eng.run(2, 2, params)
        finally:
            del eng.unet.forward
        outs.append(seen[-1])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_bench_command_runs_on_cpu(capsys):
    assert main(["--engine", "a1111", "--arch", "sdxl", "--steps", "1", "--repeats", "1",
                 "--split", "--am-layer", "--clock", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,), (split,), (layer,) = report["rows"], report["split"], report["am_layer"]
    assert row["engine"] == "a1111" and row["record_bytes"] > 0
    assert row["host_peak_bytes"] == row["record_bytes"] and row["host_left_bytes"] == 0
    assert {"fm_ms", "am_ms", "plain_step_ms"} <= split.keys() and "transfer_ms" not in split
    assert layer["AM layer"] > 0 and layer["tokens"] == 16 * 16      # preset: native 8×8 at 2×


def test_gpu_command_refuses_without_cuda_and_the_script_parses(capsys):
    import os
    import subprocess
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--preset", "gpu"])
        assert "no CUDA device" in capsys.readouterr().err
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu.sh")
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", script]).returncode == 0

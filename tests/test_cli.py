"""The generate CLI on a tiny model with the SmolLM2 tokenizer: once as users run it (a subprocess: exit code,
streamed text, no traceback), otherwise in this process through the same ``cli.main`` (a subprocess would only
import torch and transformers again)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kangaroo_infer.cli import main


def run_cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kangaroo_infer", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def cli(capsys):
    """``python -m kangaroo_infer ARGS`` in this process: the same main(), its exit code, stdout and stderr."""

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        assert torch.is_grad_enabled(), "main() turned gradients off in its caller (tests after it would not train)"
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return call


def test_generate_streams_the_vanilla_text_and_reports_tau(tiny_dirs):
    root, model, tokenizer = tiny_dirs
    result = run_cli(
        "generate", "--adapter", str(root / "adapter"), "--prompt", "Hello there", "--max-new-tokens", "24"
    )
    assert result.returncode == 0, result.stderr
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    ref = model.generate(ids, do_sample=False, max_new_tokens=24)
    expected = tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.stdout.strip() == expected.strip()
    assert "tokens/s" in result.stderr and "τ =" in result.stderr


def test_generate_chat_with_fresh_adapter_and_explicit_base(tiny_dirs, cli):
    root, model, tokenizer = tiny_dirs
    result = cli(
        "generate", "--base", str(root / "base"), "--exit-layer", "1", "--prompt", "Hi", "--chat",
        "--max-new-tokens", "12", "--threshold", "0.2", "--steps", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, do_sample=False, max_new_tokens=12)
    assert result.stdout.strip() == tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--adapter", "/no/such/adapter"], "does not exist or is not a directory"),
        (["--base", "/no/such/model", "--exit-layer", "1"], "neither an existing directory"),
        ([], "Pass --adapter DIR"),
    ],
)
def test_generate_errors_are_one_clear_line(tiny_dirs, cli, args, message):
    result = cli("generate", *args, "--prompt", "x")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_exit_layer_out_of_range_on_cli(tiny_dirs, cli):
    root, _, _ = tiny_dirs
    result = cli("generate", "--base", str(root / "base"), "--exit-layer", "4", "--prompt", "x")
    assert result.returncode == 2 and "choose an integer in [1, 3]" in result.stderr


def test_lookup_tokens_on_cli(tiny_dirs, cli):
    root, _, _ = tiny_dirs
    adapter = ["--adapter", str(root / "adapter"), "--prompt", "a b a b a b", "--max-new-tokens", "8"]
    assert cli("generate", *adapter, "--lookup-tokens", "0").returncode == 0
    result = cli("generate", *adapter, "--lookup-tokens", "-2")
    assert result.returncode == 2 and "--lookup-tokens must be an integer >= 0" in result.stderr
    result = cli("generate", *adapter, "--lookup-tokens", "3", "--temperature", "0.5")  # copies work sampled too
    assert result.returncode == 0 and "Traceback" not in result.stderr

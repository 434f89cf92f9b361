"""No third-party noise on the console: bitsandbytes stays unimported until asked for, library logs go to a file.

bitsandbytes logs "Failed to load CPU gemm_4bit_forward ... pip install kernels" at import, but only on
CPUs with AVX512-BF16; ``FORCE_AVX512BF16`` makes every CPU take that branch, so these tests fail
without the guard on any machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Runs before anything else in a child interpreter: patch bitsandbytes' CPU-feature probe right after
# its module executes, so its CPU backend (imported by bitsandbytes/__init__) takes the AVX512-BF16 path.
FORCE_AVX512BF16 = """
import importlib.abc, importlib.machinery, sys
class _Force(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real = spec.loader.exec_module
        def exec_module(module):
            real(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _Force())
"""
NOISE = "gemm_4bit_forward"


def _child(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "LORA_STUDIO_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", **env}
    environ.pop("LORA_STUDIO_VERBOSE", None)
    environ.update(env)
    return subprocess.run([sys.executable, "-c", FORCE_AVX512BF16 + code], capture_output=True, text=True,
                          env=environ, timeout=300)


def _bitsandbytes_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


needs_bnb = pytest.mark.skipif(not _bitsandbytes_installed(), reason="bitsandbytes is not installed")


@needs_bnb
def test_the_forced_probe_reproduces_the_noise_without_the_guard(tmp_path):
    # The reproduction itself: a plain `import peft` prints the line once the probe says AVX512-BF16.
    proc = _child("import peft", tmp_path)
    assert NOISE in proc.stderr


@needs_bnb
def test_cli_errors_are_one_line_even_where_bitsandbytes_is_noisy(tmp_path):
    code = ("import sys\nfrom studio.app.cli import main\n"
            f"sys.exit(main(['generate', 'x', '--steps', '0', '--out', {str(tmp_path)!r}]))")
    proc = _child(code, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "steps must be" in proc.stderr


@needs_bnb
def test_a_generation_prints_nothing_but_its_result(tmp_path):
    code = ("import sys\nfrom studio.app.cli import main\n"
            f"sys.exit(main(['generate', 'a red circle on a blue background', '--steps', '2', "
            f"'--out', {str(tmp_path / 'out')!r}]))")
    proc = _child(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip().endswith(".png")
    # peft was imported (the generation loads LoRA machinery) and bitsandbytes was not.
    code = ("from studio.core.thirdparty import quiet_third_party\nquiet_third_party()\nimport sys, peft\n"
            "print(sys.modules.get('bitsandbytes'))")
    proc = _child(code, tmp_path)
    assert proc.stdout.strip() == "None" and proc.stderr == ""


@needs_bnb
def test_verbose_shows_library_lines_and_the_log_file_keeps_them(tmp_path):
    code = ("from studio.core.thirdparty import quiet_third_party, allow_bitsandbytes\n"
            "quiet_third_party({verbose})\nbnb = allow_bitsandbytes()\nprint(hasattr(bnb.optim, 'AdamW8bit'))")
    quiet = _child(code.format(verbose=""), tmp_path)
    assert quiet.stdout.strip() == "True" and NOISE not in quiet.stderr
    assert NOISE in (tmp_path / "home" / "logs" / "libraries.log").read_text()
    loud = _child(code.format(verbose="verbose=True"), tmp_path)
    assert loud.stdout.strip() == "True" and NOISE in loud.stderr


@needs_bnb
def test_the_trainer_command_is_quiet_too(tmp_path):
    code = "import sys\nfrom trainer.cli import main\nsys.exit(main(['/nowhere/train.toml']))"
    proc = _child(code, tmp_path)
    assert proc.returncode == 2
    assert NOISE not in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

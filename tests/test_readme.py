"""Every Python example in the README runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_readme_tells_a_newcomer_what_to_install_and_where_weights_come_from():
    cpu_torch = README.index("--index-url https://download.pytorch.org/whl/cpu")
    assert cpu_torch < README.index('python -m pip install torch==2.13.0 && python -m pip install -e ".[train]"')
    for words in ("Python 3.10 or newer", "No pretrained hybrid_lm weights are published", "is not on PyPI",
                  'pip install -e ".[cuda]"', "8.3 before training and about 5.4 after", "gibberish",
                  "## Quantization", "## Troubleshooting", '{"text": ', "hybrid-lm --version"):
        assert words in README, words


def test_nothing_tells_users_to_pip_install_a_package_pypi_lacks():
    root = Path(__file__).resolve().parent.parent
    for path in [root / "README.md", *root.glob("hybrid_lm/*.py"), *root.glob("examples/*.py")]:
        assert "pip install hybrid-lm" not in path.read_text(), path
        assert "pip install 'hybrid-lm" not in path.read_text(), path


def test_license_is_the_apache_2_0_that_pyproject_declares():
    root = Path(__file__).resolve().parent.parent
    assert 'license = "Apache-2.0"' in (root / "pyproject.toml").read_text()
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text

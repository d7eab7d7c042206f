import os
import sys
from pathlib import Path

import torch

# the tests import their oracles and builders as plain modules
sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU, Triton kernels run in Triton's CPU interpreter; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"

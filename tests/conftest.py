import sys
from pathlib import Path

# the tests import their oracles and builders as plain modules
sys.path.insert(0, str(Path(__file__).parent))

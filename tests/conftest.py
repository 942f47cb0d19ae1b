import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Resume caches of the tests (and of the scripts they start) go to a temporary folder."""
    os.environ["BCT_CACHE_DIR"] = str(tmp_path_factory.mktemp("bct_cache"))

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A narrow FIAS for CPU tests: every block of the real one, a fraction of the width and depth.
TINY_NET = dict(embed_dims=(24, 48, 96, 192), depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24),
                decoder_heads=(8, 6, 4, 2))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def requires_shared(*parts):
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not present (users' clones lack ../shared)")

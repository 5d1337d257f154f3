import os

# before huggingface_hub is imported anywhere: no hub lookups (they retry for 20-45 s offline)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # the Triton TTT kernels then run under Triton's interpreter; read when
    os.environ.setdefault("TRITON_INTERPRET", "1")  # vit3.ttt.kernels is first imported, so set here


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide singletons: a trainer test module marks its tests with this, so
    each in-process run starts from scratch."""
    from tests.trainer_helpers import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()

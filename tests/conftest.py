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


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3, randomly initialised (He init: with PyTorch's default the features
    collapse and every FID is 0), saved as a local weights file: no download."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    orig_url, orig_load = inc.load_state_dict_from_url, inc.FeatureExtractorInceptionV3.load_state_dict
    inc.load_state_dict_from_url = lambda *a, **k: {}
    inc.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        inc.load_state_dict_from_url, inc.FeatureExtractorInceptionV3.load_state_dict = orig_url, orig_load
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.01)
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def vit_file(tmp_path_factory):
    """Random weights of timm's test_vit (patch 16, 64 dims, one class token) in a local file: a REPA encoder
    loaded as a pretrained one is (repa.encoder_file), with no download."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "test_vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    return path

"""Harmony evaluator: a torchvision-layout ResNet-50 state dict made here loads and scores as a plain
functional ResNet-50 written from the architecture's facts."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from comfyui_harmonize.nodes import evaluation as N
from comfyui_harmonize.pipelines.evaluation import evaluator as ev
from comfyui_harmonize.pipelines.core.errors import WeightsError
from conftest import make_composite

LAYERS = (3, 4, 6, 3)
SIZE = 64  # network input side in the parity tests (the default, 256, is checked on the preprocessing alone;
#            a ResNet-50 forward at 256 costs seconds on a shared 2-core CPU)


def torchvision_resnet50_state_dict(seed: int = 0, in_channels: int = 4, classes: int = 2) -> dict:
    """Keys and shapes of torchvision's resnet50 (v1.5 bottlenecks, expansion 4) with random values;
    running statistics are random too so eval-mode BatchNorm is exercised."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    def bn(name, c, gamma=1.0):
        sd[f"{name}.weight"] = gamma * (1 + 0.1 * torch.randn(c, generator=g))
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 1 + 0.2 * torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(100)

    conv("conv1", 64, in_channels, 7)
    bn("bn1", 64)
    cin = 64
    for i, n in enumerate(LAYERS):
        width = 64 * 2 ** i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            conv(f"{p}.conv1", width, cin, 1)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2", width, width, 3)
            bn(f"{p}.bn2", width)
            conv(f"{p}.conv3", width * 4, width, 1)
            bn(f"{p}.bn3", width * 4, gamma=0.3)
            if j == 0:
                conv(f"{p}.downsample.0", width * 4, cin, 1)
                bn(f"{p}.downsample.1", width * 4)
            cin = width * 4
    sd["fc.weight"] = torch.randn(classes, 2048, generator=g) * 0.05
    sd["fc.bias"] = torch.randn(classes, generator=g) * 0.1
    return sd


def functional_resnet50(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """ResNet-50 forward in plain functional torch: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool, bottleneck
    stages [3,4,6,3] with the stride on the 3x3 convolution, global average pool, linear."""

    def bn(h, name):
        return F.batch_norm(h, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)

    h = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    h = F.max_pool2d(h, 3, stride=2, padding=1)
    for i, n in enumerate(LAYERS):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            stride = 2 if (i > 0 and j == 0) else 1
            out = F.relu(bn(F.conv2d(h, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
            out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            idn = bn(F.conv2d(h, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") if j == 0 else h
            h = F.relu(out + idn)
    return F.linear(h.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])


def reference_scores(sd, image, mask, size=SIZE):
    x = F.interpolate(image.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False)
    m = F.interpolate(mask[:, None], size=(size, size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = functional_resnet50(sd, torch.cat([(x - 0.5) / 0.5, m], 1))
    return torch.softmax(logits, 1)[:, 1]


@pytest.fixture(scope="module")
def tv_sd():
    return torchvision_resnet50_state_dict()


@pytest.fixture(scope="module")
def batch():
    return make_composite(96, 80, batch=2, seed=3)


@pytest.fixture(scope="module")
def ref(tv_sd, batch):
    return reference_scores(tv_sd, *batch)


def test_preprocessing_is_the_papers_input(batch):
    image, mask = batch
    x = ev.preprocess(image, mask)
    assert x.shape == (2, 4, 256, 256)
    up = F.interpolate(image.permute(0, 3, 1, 2), size=(256, 256), mode="bilinear", align_corners=False)
    assert torch.allclose(x[:, :3], (up - 0.5) / 0.5, atol=1e-6)  # RGB normalised with mean 0.5, std 0.5
    m = F.interpolate(mask[:, None], size=(256, 256), mode="bilinear", align_corners=False)
    assert torch.allclose(x[:, 3:], m, atol=1e-6)  # the mask channel stays in 0..1


def test_torchvision_pth_loads_and_scores_like_the_functional_reference(tv_sd, batch, ref, tmp_path):
    path = tmp_path / "evaluator.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv_sd.items()}}, path)  # a training checkpoint
    evaluator = ev.load_evaluator(path)
    assert evaluator.model.layers_config == LAYERS and evaluator.size == 256
    evaluator.size = SIZE
    image, mask = batch
    copies = image.clone(), mask.clone()
    scores = evaluator(image, mask)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert ((scores > 0) & (scores < 1)).all()
    assert torch.allclose(scores, ref, atol=1e-5), (scores, ref)
    assert torch.equal(image, copies[0]) and torch.equal(mask, copies[1])
    # the score depends on the mask channel
    assert not torch.allclose(evaluator(image, 1 - mask), scores)


def test_own_safetensors_round_trip_and_official_layout(tv_sd, batch, ref, tmp_path):
    image, mask = batch
    base = ev.load_evaluator(_save_pth(tv_sd, tmp_path / "tv.pth"))
    out = ev.save_evaluator(base.model, tmp_path / "evaluator.safetensors", size=SIZE, extra={"trained_on": "test"})
    meta = ev.read_metadata(out)
    assert meta["format"] == ev.FORMAT and meta["input_size"] == str(SIZE) and meta["trained_on"] == "test"
    again = ev.load_evaluator(out)  # the input size comes from the file's metadata
    assert again.size == SIZE
    assert torch.allclose(again(image, mask), ref, atol=1e-5)
    with pytest.raises(Exception, match="already exists"):
        ev.save_evaluator(base.model, out)
    # the official classifier's parameter names (inp_encoder / encoder.N / classify_fc)
    official = {}
    for k, v in tv_sd.items():
        for old, new in (("conv1.", "inp_encoder."), ("bn1.", "encoder.0."), ("fc.", "classify_fc.")):
            if k.startswith(old):
                k = new + k[len(old):]
                break
        else:
            stage = int(k[len("layer")])
            k = f"encoder.{stage + 2}." + k.split(".", 1)[1]
        official[k] = v
    assert "encoder.6.2.conv3.weight" in official
    official_model = ev.load_evaluator(_save_pth(official, tmp_path / "official.pth"))
    for a, b in zip(official_model.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def _save_pth(sd, path):
    torch.save(sd, path)
    return path


def test_wrong_weights_are_refused_with_the_reason(tv_sd, tmp_path):
    three = dict(tv_sd)
    three["conv1.weight"] = three["conv1.weight"][:, :3].contiguous()
    with pytest.raises(WeightsError, match="3 channels"):
        ev.load_evaluator(_save_pth(three, tmp_path / "rgb.pth"))
    five = dict(tv_sd)
    five["fc.weight"], five["fc.bias"] = torch.zeros(5, 2048), torch.zeros(5)
    with pytest.raises(WeightsError, match="5 outputs"):
        ev.load_evaluator(_save_pth(five, tmp_path / "five.pth"))
    broken = {k: v for k, v in tv_sd.items() if not k.startswith("layer3.2.")}
    with pytest.raises(WeightsError, match="missing keys"):
        ev.load_evaluator(_save_pth(broken, tmp_path / "broken.pth"))
    with pytest.raises(WeightsError, match="not a ResNet"):
        ev.load_evaluator(_save_pth({"weight": torch.zeros(2)}, tmp_path / "other.pth"))
    with pytest.raises(WeightsError, match="not found"):
        ev.load_evaluator(tmp_path / "absent.pth")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"conv1.weight": Payload()}, f)
    with pytest.raises(WeightsError, match="refused"):
        ev.load_evaluator(evil)


def test_nodes_load_from_the_model_folder_and_score(tv_sd, batch, ref, tmp_path, monkeypatch):
    folder = tmp_path / "models" / "harmony_evaluator"
    folder.mkdir(parents=True)
    torch.save(tv_sd, folder / "resnet50_harmony.pth")
    monkeypatch.setenv("HARMONIZE_MODELS_DIR", str(tmp_path / "models"))
    choices = N.HarmonizeEvaluatorLoader.INPUT_TYPES()["required"]["evaluator_name"][0]
    assert choices == ["resnet50_harmony.pth"]
    (evaluator,) = N.HarmonizeEvaluatorLoader().load("resnet50_harmony.pth", "fp32")
    evaluator.size = SIZE
    image, mask = batch
    out = N.HarmonizeEvaluatorScore().score(evaluator, image, mask)
    mean, report = out["result"]
    assert mean == pytest.approx(float(ref.mean()), abs=1e-5)
    assert out["ui"]["text"] == [report] and "image 1" in report
    with pytest.raises(WeightsError, match="not found"):
        N.HarmonizeEvaluatorLoader().load("missing.pth", "fp32")
    for cls in (N.HarmonizeEvaluatorLoader, N.HarmonizeEvaluatorScore):
        assert all("tooltip" in spec[1] for spec in cls.INPUT_TYPES()["required"].values())
        assert cls.DESCRIPTION


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = ev.ResNet((1, 1, 1, 1), base_width=8).train()
    x = torch.randn(2, 4, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_zero_shot_loop_takes_the_loaded_evaluator(tmp_path):
    """The loader's output type is the zero-shot loop's evaluator input, and the loop's rule ranks results
    with the loaded classifier's scores."""
    from comfyui_harmonize.nodes import zero_shot as ZN
    from comfyui_harmonize.pipelines.zero_shot import loop as zl
    from comfyui_harmonize.pipelines.describe.descriptions import Description

    assert ZN.HarmonizeZeroShotIterative.INPUT_TYPES()["optional"]["evaluator"][0] == \
        N.HarmonizeEvaluatorLoader.RETURN_TYPES[0] == "HARMONIZE_EVALUATOR"
    torch.manual_seed(0)
    model = ev.ResNet((1, 1, 1, 1), base_width=8)
    with torch.no_grad():  # a fresh ResNet's blocks start as identities (zero bn3): make them see the image
        model.fc.weight.normal_(0, 1.0)
        for block in model.modules():
            if isinstance(block, ev.Bottleneck):
                block.bn3.weight.fill_(1.0)
    evaluator = ev.load_evaluator(ev.save_evaluator(model, tmp_path / "tiny.safetensors", size=32))
    image, mask = make_composite(40, 40, seed=1)
    gains = {"warm": 1.3, "cold": 0.7, "dark": 0.4}
    candidates = [Description("cat", (w,), ("winter",)) for w in gains]

    def harmonize(state, desc):  # a stand-in harmonizer: scales the foreground's colours
        return torch.where(mask[..., None] > 0.5, (state * gains[desc.foreground[0]]).clamp(0, 1), state)

    trials, best = zl.iterate(image, candidates, harmonize, lambda out: float(evaluator(out, mask)[0]),
                              lambda tried: None, iterations=3)
    scores = [float(evaluator(t.output, mask)[0]) for t in trials]
    assert [t.score for t in trials] == scores and len(set(scores)) > 1
    assert trials[best].score == max(scores)
    assert max(range(3), key=lambda i: scores[i]) == trials[3].parent  # iteration 1 continues from the best candidate

"""EncoderCNN / DecoderRNN: shapes, what trains and what stays frozen, state dicts, the seeded random backbone."""

import pytest
import torch

from model import FEATURE_SIZE, DecoderRNN, EncoderCNN, resnet50_backbone

EMBED, HIDDEN, VOCAB = 32, 24, 50


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder() -> EncoderCNN:
    return EncoderCNN(EMBED, pretrained=False)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def batchnorm_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_shapes(encoder, images):
    assert encoder.backbone(images).shape == (2, FEATURE_SIZE)
    features = encoder(images)
    assert features.shape == (2, EMBED)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers=2)
    captions = torch.randint(0, VOCAB, (2, 7))
    assert decoder(features, captions).shape == (2, 7, VOCAB)
    logits, (h, c) = decoder.step(features)
    assert logits.shape == (2, VOCAB) and h.shape == c.shape == (2, 2, HIDDEN)
    ids = decoder.sample(features[:1].unsqueeze(1), max_len=5)
    assert 1 <= len(ids) <= 5 and all(isinstance(i, int) for i in ids)


def test_template_state_dict_keys(encoder):
    keys = set(encoder.state_dict())
    assert {
        "resnet.0.weight",
        "resnet.1.running_mean",
        "resnet.4.0.conv1.weight",
        "resnet.7.2.bn3.weight",
    } <= keys
    assert {"embed.weight", "embed.bias"} <= keys
    assert not any(k.startswith(("fc.", "resnet.9")) for k in keys)
    assert encoder.state_dict()["embed.weight"].shape == (EMBED, FEATURE_SIZE)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers=2)
    lstm = {f"lstm.{n}_l{k}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for k in (0, 1)}
    assert set(decoder.state_dict()) == {"embed.weight", "fc.weight", "fc.bias"} | lstm
    assert decoder.state_dict()["embed.weight"].shape == (VOCAB, EMBED)
    assert decoder.state_dict()["fc.weight"].shape == (VOCAB, HIDDEN)


def test_frozen_backbone_gets_no_gradient_and_keeps_its_batchnorm_statistics(encoder, images):
    before = batchnorm_state(encoder)
    encoder.train()
    assert encoder.training and not encoder.resnet.training
    assert not any(m.training for m in encoder.resnet.modules())
    encoder.zero_grad()
    encoder(images * 3 + 1).square().mean().backward()  # inputs far from the running statistics
    assert all(p.grad is None for p in encoder.resnet.parameters())
    assert encoder.embed.weight.grad is not None and encoder.embed.weight.grad.abs().sum() > 0
    after = batchnorm_state(encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)
    encoder.eval()


def test_trainable_parameters_are_exactly_embed_and_decoder(encoder):
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers=2)
    trainable = {f"encoder.{n}" for n, p in encoder.named_parameters() if p.requires_grad}
    trainable |= {f"decoder.{n}" for n, p in decoder.named_parameters() if p.requires_grad}
    expected = {"encoder.embed.weight", "encoder.embed.bias"} | {f"decoder.{n}" for n in decoder.state_dict()}
    assert trainable == expected


def test_train_cnn_unfreezes_only_the_last_block(images):
    encoder = EncoderCNN(EMBED, pretrained=False, train_cnn=True)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in encoder.named_parameters() if n.startswith(("resnet.7.", "embed."))}
    before = batchnorm_state(encoder)
    encoder.train()
    encoder(images).square().mean().backward()
    assert all(p.grad is not None for p in encoder.resnet[7].parameters())
    assert all(p.grad is None for p in encoder.resnet[6].parameters())
    after = batchnorm_state(encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)  # fine-tuning keeps the statistics too


def test_state_dicts_round_trip_into_fresh_modules(encoder, images):
    fresh = EncoderCNN(EMBED, pretrained=False, backbone_seed=1)
    assert not torch.equal(fresh(images), encoder(images))
    fresh.load_state_dict(encoder.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(images), encoder.eval()(images))
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers=2).eval()
    other = DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers=2).eval()
    other.load_state_dict(decoder.state_dict(), strict=True)
    features, captions = encoder(images), torch.randint(0, VOCAB, (2, 6))
    assert torch.equal(other(features, captions), decoder(features, captions))


def test_frozen_backbone_runs_with_its_batchnorms_folded_and_follows_weight_changes(encoder, images):
    with torch.no_grad():
        unfolded = encoder.resnet(images.contiguous(memory_format=torch.channels_last)).flatten(1)
    folded_features = encoder.backbone(images)
    assert torch.allclose(folded_features, unfolded, rtol=1e-4, atol=1e-5 * unfolded.abs().max())
    folded = encoder._folded[1]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.resnet.modules()) == 53
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    encoder.backbone(images)
    assert encoder._folded[1] is folded  # made once, reused while the weights stay
    assert not any("_folded" in key for key in encoder.state_dict())

    # new weights (load_state_dict, as load_pretrained does) give their own features, not the old fold's
    reloaded = EncoderCNN(EMBED, pretrained=False, backbone_seed=1)
    own_weights = {k: v.clone() for k, v in reloaded.state_dict().items()}
    before = reloaded.backbone(images)
    reloaded.load_state_dict(encoder.state_dict())
    assert torch.equal(reloaded.backbone(images), folded_features)
    reloaded.double()  # and a new dtype (or device)
    in_double = reloaded.backbone(images.double()).float()
    assert torch.allclose(in_double, folded_features, rtol=1e-4, atol=1e-5 * unfolded.abs().max())
    assert not torch.allclose(before, folded_features)
    # and weights assigned anew (load_state_dict(assign=True) of fresh tensors, whose version counters all read 0)
    for state, expected in ((encoder.state_dict(), folded_features), (own_weights, before)):
        reloaded.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        assert torch.equal(reloaded.backbone(images), expected)

    # fine-tuning never folds: an optimizer may change resnet.7 without a trace
    fine_tuned = EncoderCNN(EMBED, pretrained=False, train_cnn=True)
    with torch.no_grad():
        assert not fine_tuned.backbone(images).requires_grad  # no graph kept when no gradient is wanted
    assert fine_tuned._folded == (None, None)


def test_a_backbone_put_in_training_mode_by_hand_runs_its_real_batchnorms(images):
    """`encoder.resnet.train()` (to re-estimate BatchNorm statistics on new images) is not folded away: the batch
    statistics are used and the running ones updated."""
    encoder = EncoderCNN(EMBED, pretrained=False)
    encoder.resnet.train()
    before = batchnorm_state(encoder)
    encoder.backbone(images)
    after = batchnorm_state(encoder)
    assert not torch.equal(before["resnet.1.running_mean"], after["resnet.1.running_mean"])
    assert encoder._folded == (None, None)


def test_random_backbone_depends_only_on_its_seed(encoder):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    backbone = resnet50_backbone(pretrained=False, seed=0)
    assert torch.equal(torch.rand(3), expected_draw)  # the global random stream is left alone
    resnet, same_resnet = encoder.resnet.state_dict(), backbone.state_dict()
    assert resnet.keys() == same_resnet.keys()
    assert all(torch.equal(resnet[k], same_resnet[k]) for k in resnet)
    same = EncoderCNN(EMBED, pretrained=False, backbone_seed=0)
    assert same.backbone_fingerprint() == encoder.backbone_fingerprint()
    other = EncoderCNN(EMBED, pretrained=False, backbone_seed=1)
    assert other.backbone_fingerprint() != encoder.backbone_fingerprint()


def test_imagenet_weights_load_from_a_file_and_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """weights_path= and pretrained=True (torchvision's download cache, filled here by hand: no network) give the
    file's exact weights, in float32 and channels_last; bad files fail in one line naming the file."""
    import torchvision.models as models

    from model import PretrainedWeightsUnavailable

    torch.manual_seed(7)
    state = {k: v.half() if v.is_floating_point() else v for k, v in models.resnet50().state_dict().items()}
    weights_file = tmp_path / "r50.pth"
    torch.save(state, weights_file)
    hub_file = tmp_path / "hub" / "checkpoints" / models.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    hub_file.parent.mkdir(parents=True)
    torch.save(state, hub_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for encoder in (EncoderCNN(EMBED, weights_path=weights_file), EncoderCNN(EMBED, pretrained=True)):
        loaded = encoder.resnet.state_dict()
        assert torch.equal(loaded["0.weight"], state["conv1.weight"].float())
        assert torch.equal(loaded["7.2.bn3.running_var"], state["layer4.2.bn3.running_var"].float())
        assert all(v.dtype != torch.float16 and v.device.type == "cpu" for v in loaded.values())
        assert encoder.resnet[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not any(p.requires_grad for p in encoder.resnet.parameters())
        assert encoder.backbone(torch.ones(1, 3, 32, 32)).isfinite().all()

    torch.save({"conv1.weight": torch.zeros(3)}, weights_file)
    with pytest.raises(PretrainedWeightsUnavailable, match=r"r50\.pth: not a ResNet-50 state dict \(Missing key"):
        EncoderCNN(EMBED, weights_path=weights_file)
    weights_file.write_bytes(b"not a pickle")
    with pytest.raises(PretrainedWeightsUnavailable, match=r"r50\.pth: truncated or corrupt") as error:
        EncoderCNN(EMBED, weights_path=weights_file)
    assert "\n" not in str(error.value)


def test_a_planted_file_in_the_torch_hub_cache_cannot_run_code(tmp_path, monkeypatch):
    """The cache file the offline hint names is read with weights_only (as weights_path= is): code in it is refused
    in one line naming the file, and nothing runs."""
    import torchvision.models as models
    from test_load_pretrained import Evil

    from model import PretrainedWeightsUnavailable

    marker = tmp_path / "the-pickle-ran-code"
    hub_file = tmp_path / "hub" / "checkpoints" / models.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    hub_file.parent.mkdir(parents=True)
    torch.save({**models.resnet50().state_dict(), "extra": Evil(marker)}, hub_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable, match="not loaded for safety") as error:
        EncoderCNN(EMBED, pretrained=True)
    assert not marker.exists()
    assert str(error.value).startswith(f"{hub_file}: ") and "\n" not in str(error.value)
    assert str(error.value).endswith("; or delete it to download it again")


def test_hub_cached_file_downloads_once_and_checks_the_hash_in_the_name(tmp_path, monkeypatch):
    """A fresh download must match the SHA-256 prefix in its name (as torchvision's files are named); a loopback
    server stands in for download.pytorch.org."""
    import functools
    import hashlib
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from model import hub_cached_file

    served = tmp_path / "served"
    served.mkdir()
    data = b"weights" * 100
    good = f"net-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (served / good).write_bytes(data)
    (served / "net-00000000.pth").write_bytes(data)  # a name whose hash the content does not have
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    checkpoints = tmp_path / "home" / "hub" / "checkpoints"
    try:
        with pytest.raises(RuntimeError, match="invalid hash value"):
            hub_cached_file(f"{url}/net-00000000.pth")
        assert list(checkpoints.iterdir()) == []  # nothing half-checked left behind
        assert hub_cached_file(f"{url}/{good}") == checkpoints / good
        assert (checkpoints / good).read_bytes() == data
        (served / good).unlink()
        assert hub_cached_file(f"{url}/{good}") == checkpoints / good  # from the cache, no second download
    finally:
        httpd.shutdown()


def test_an_encoder_made_and_run_under_inference_mode_gives_the_same_features(encoder, images, tmp_path):
    """Weights made under torch.inference_mode have no version counter: the encoder runs them unfolded, and a
    load_state_dict into them inside inference_mode (an in-place copy) is still seen."""
    from model import load_encoder

    path = tmp_path / "encoder-1.pkl"
    torch.save(encoder.state_dict(), path)
    other = EncoderCNN(EMBED, pretrained=False, backbone_seed=1)
    with torch.no_grad():
        expected, expected_other = encoder(images), other(images)
    def same(a, b):  # unfolded and folded BatchNorms differ by float rounding
        return torch.allclose(a.float(), b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))

    with torch.inference_mode():
        loaded = load_encoder(path)
        assert same(loaded(images), expected)
        loaded.load_state_dict(other.state_dict())
        assert same(loaded(images), expected_other)
        in_double = EncoderCNN(EMBED, pretrained=False).double()  # the same seeded backbone as `encoder`
        assert same(in_double.backbone(images.double()), encoder.backbone(images))
        assert loaded._folded == in_double._folded == (None, None)
    assert same(loaded(images), expected_other)
    with torch.inference_mode():  # normal weights run under inference_mode still fold
        assert torch.equal(encoder(images), expected) and encoder._folded[1] is not None


def test_refold_after_an_edit_through_data(images):
    """`.data` edits bypass the version counter, so the fold is stale until refold()."""
    encoder = EncoderCNN(EMBED, pretrained=False).eval()
    encoder.backbone(images)
    with torch.no_grad():
        encoder.resnet[1].running_var.data.mul_(4)
        unfolded = encoder.resnet(images.contiguous(memory_format=torch.channels_last)).flatten(1)
    assert not torch.allclose(encoder.backbone(images), unfolded, atol=1e-4)  # the documented limit
    encoder.refold()
    assert torch.allclose(encoder.backbone(images), unfolded, rtol=1e-4, atol=1e-5 * unfolded.abs().max())


def test_devices_that_are_not_here_are_refused_by_name():
    from model import resolve_device

    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="device mps asked for, but Apple MPS is not available here"):
            resolve_device("mps")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
        with pytest.raises(ValueError, match=rf"device cuda:{count} asked for, but this machine has only"):
            resolve_device(f"cuda:{count}")
    else:
        for name in ("cuda", "cuda:5"):
            with pytest.raises(ValueError, match=rf"device {name} asked for, but CUDA is not available here"):
                resolve_device(name)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_device_is_the_best_one_present():
    from model import resolve_device

    present = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device() == torch.device(present)
    assert torch.ones(1, device=resolve_device("auto")).sum().item() == 1

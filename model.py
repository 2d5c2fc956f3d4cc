"""The captioner: EncoderCNN (frozen ResNet-50 + Linear) and DecoderRNN (Embedding, LSTM, Linear).

Attribute names match the Udacity CVND template, so `encoder-N.pkl` / `decoder-N.pkl` state dicts move both ways.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from torchvision import models

FEATURE_SIZE = 2048  # ResNet-50's pooled output
START_ID, END_ID = 0, 1  # fixed by Vocabulary: <start>, <end>, <unk> are ids 0, 1, 2


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights for the backbone could not be downloaded or read."""


def resnet50_backbone(pretrained: bool = True, weights_path: str | os.PathLike | None = None, seed: int = 0):
    """torchvision's ResNet-50 without `fc`, as the template's `nn.Sequential` (keys resnet.0 ... resnet.8).

    With `pretrained=False` the random init is drawn from `seed`, so every run gets the same network and cached
    features stay valid.
    """
    if weights_path is not None:
        resnet = models.resnet50(weights=None)
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            resnet.load_state_dict(state)
        except (OSError, RuntimeError, ValueError) as e:
            raise PretrainedWeightsUnavailable(f"{weights_path}: not a ResNet-50 state dict ({e})") from None
    elif pretrained:
        weights = models.ResNet50_Weights.IMAGENET1K_V1
        try:
            resnet = models.resnet50(weights=weights)
        except Exception as e:
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise PretrainedWeightsUnavailable(
                f"cannot get ImageNet weights for ResNet-50 ({type(e).__name__}: {e}). Offline? Download "
                f"{weights.url} elsewhere and put it at {cache}, or pass weights_path=, or use pretrained=False"
            ) from None
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resnet = models.resnet50(weights=None)
    return nn.Sequential(*list(resnet.children())[:-1])


class EncoderCNN(nn.Module):
    """Frozen ResNet-50 -> 2048-d pooled feature -> Linear `embed` to the decoder's input size.

    The backbone never trains its BatchNorm statistics (it stays in eval mode even under `.train()`); with
    `train_cnn=True` its last block (`resnet.7`, layer4) receives gradients for fine-tuning.
    """

    def __init__(
        self,
        embed_size: int = 512,
        pretrained: bool = True,
        weights_path: str | os.PathLike | None = None,
        train_cnn: bool = False,
        backbone_seed: int = 0,
    ):
        super().__init__()
        self.resnet = resnet50_backbone(pretrained, weights_path, backbone_seed)
        self.resnet.requires_grad_(False)
        self.train_cnn = train_cnn
        if train_cnn:
            self.resnet[7].requires_grad_(True)
        self.embed = nn.Linear(FEATURE_SIZE, embed_size)
        self.resnet.eval()

    def train(self, mode: bool = True) -> EncoderCNN:
        super().train(mode)
        self.resnet.eval()
        return self

    def backbone(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled ResNet-50 features [B, 2048] of normalised images [B, 3, H, W]: what the feature cache stores."""
        with torch.set_grad_enabled(self.train_cnn and torch.is_grad_enabled()):
            return self.resnet(images).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.backbone(images))

    def backbone_fingerprint(self) -> str:
        """Hash of the backbone's weights: part of the feature cache's key."""
        digest = hashlib.sha256()
        for name, tensor in self.resnet.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


class DecoderRNN(nn.Module):
    """LSTM language model conditioned on the image: the image embedding is its first input."""

    def __init__(
        self, embed_size: int, hidden_size: int, vocab_size: int, num_layers: int = 1, dropout: float = 0.0
    ):
        super().__init__()
        self.embed_size, self.hidden_size, self.vocab_size = embed_size, hidden_size, vocab_size
        self.num_layers = num_layers
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(
            embed_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.fc = nn.Linear(hidden_size, vocab_size)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: inputs are [image, w0 .. w(L-2)]; output [B, L, V] predicts w0 .. w(L-1)."""
        inputs = torch.cat((features.unsqueeze(1), self.embed(captions[:, :-1])), dim=1)
        hiddens, _ = self.lstm(inputs)
        return self.fc(hiddens)

    def step(self, inputs: torch.Tensor, states=None):
        """One decoding step for a batch: inputs [B, E] -> logits [B, V], new (h, c) states."""
        output, states = self.lstm(inputs.unsqueeze(1), states)
        return self.fc(output.squeeze(1)), states

    @torch.no_grad()
    def sample(self, inputs: torch.Tensor, states=None, max_len: int = 20) -> list[int]:
        """The template's greedy decoding of one image embedding ([1, 1, E]): predicted ids, up to <end>."""
        inputs = inputs.reshape(1, -1)
        ids: list[int] = []
        for _ in range(max_len):
            logits, states = self.step(inputs, states)
            word = logits.argmax(-1)
            ids.append(int(word))
            if ids[-1] == END_ID:
                break
            inputs = self.embed(word)
        return ids


def save_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """`torch.save(module.state_dict())` to `path` atomically (temp file + rename), as the template's pickles."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    atomic_torch_save(state, path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a temp file in the same folder and a rename: a crash never leaves a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

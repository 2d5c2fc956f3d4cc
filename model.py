"""The captioner: EncoderCNN (frozen ResNet-50 + Linear) and DecoderRNN (Embedding, LSTM, Linear).

Attribute names match the Udacity CVND template, so `encoder-N.pkl` / `decoder-N.pkl` state dicts move both ways.
Also here: DecoderRNN's batched greedy / beam / sampled decoding (thin methods over decoding.py, whose START_ID,
END_ID and helpers it re-exports) and `load_pretrained()`, which loads the weight files of this project and of the
CVND family (renamed layers, PyTorch 0.4 files) with clear errors, and `Captioner`, the two as one module for
training (train.py).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models

import decoding
from decoding import END_ID as END_ID
from decoding import START_ID as START_ID
from decoding import cut_at_end as cut_at_end
from decoding import forbid_empty_caption as forbid_empty_caption
from decoding import top_k_first as top_k_first
from fileio import atomic_write
from vocabulary import Vocabulary

FEATURE_SIZE = 2048  # ResNet-50's pooled output


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights for the backbone could not be downloaded or read."""


def resnet50_backbone(pretrained: bool = True, weights_path: str | os.PathLike | None = None, seed: int = 0):
    """torchvision's ResNet-50 without `fc`, as the template's `nn.Sequential` (keys resnet.0 ... resnet.8).

    With `pretrained=False` the random init is drawn from `seed`, so every run gets the same network and cached
    features stay valid.
    """
    if weights_path is not None or pretrained:
        cached = weights_path is None
        if cached:
            weights = models.ResNet50_Weights.IMAGENET1K_V1
            try:
                weights_path = hub_cached_file(weights.url)
            except Exception as e:
                cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
                raise PretrainedWeightsUnavailable(
                    f"cannot get ImageNet weights for ResNet-50 ({type(e).__name__}: {e}). Offline? Download "
                    f"{weights.url} elsewhere and put it at {cache}, or pass weights_path=, or use pretrained=False"
                ) from None
        try:
            state = read_state_dict(weights_path)  # weights_only: a planted cache file cannot run code
        except WeightsFileError as e:
            hint = "; or delete it to download it again" if cached else ""
            raise PretrainedWeightsUnavailable(f"{e}{hint}") from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        with torch.device("meta"):  # no random init of 25M weights that are about to be replaced (~0.3 s)
            resnet = models.resnet50(weights=None)
        try:
            resnet.load_state_dict(state, assign=True)
        except RuntimeError as e:
            raise PretrainedWeightsUnavailable(
                f"{weights_path}: not a ResNet-50 state dict ({_mismatch(e)})"
            ) from None
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resnet = models.resnet50(weights=None)
    return nn.Sequential(*list(resnet.children())[:-1])


def hub_cached_file(url: str) -> Path:
    """torch hub's copy of a weights URL ($TORCH_HOME/hub/checkpoints/NAME), downloaded first when missing.

    A fresh download is checked against the SHA-256 prefix in its name (NAME-<hash>.pth), as torchvision does.
    Only the path: callers read it with `read_state_dict` (weights_only), as any weights file, since a file
    already in the cache was never checked and could be planted.
    """
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
        digest = re.search(r"-([a-f0-9]+)\.", file.name)
        torch.hub.download_url_to_file(url, str(file), digest.group(1) if digest else None, progress=True)
    return file


def fold_batchnorm(resnet: nn.Sequential) -> nn.Sequential:
    """A copy of an eval-mode ResNet with each BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is a fixed per-channel scale and shift, which the convolution's weights and bias can
    absorb: the same features up to float rounding, without 53 passes over the activations (5-10% of a ResNet-50
    forward on a CPU).
    """
    folded = copy.deepcopy(resnet).requires_grad_(False)
    for module in list(folded.modules()):
        # the stem (0, 1), each Bottleneck's (conv1, bn1) ... (conv3, bn3), each downsample's (0, 1)
        for conv_name, bn_name in (("0", "1"), ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
            conv, bn = module._modules.get(conv_name), module._modules.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return folded.to(memory_format=torch.channels_last)


class FrozenResNet(nn.Module):
    """The frozen ResNet-50 both encoders share, and the features they read off it (pooled, or as a grid).

    The backbone never trains its BatchNorm statistics (it stays in eval mode even under `.train()`); with
    `train_cnn=True` its last block (`resnet.7`, layer4) receives gradients for fine-tuning.
    """

    image_size = 224  # side of the square crop it expects; `load_encoder` sets it from train_config.json

    def __init__(
        self,
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

    def _finish_backbone(self) -> None:
        """Eval mode and channels-last memory for the ResNet (called once the subclass made its own layers)."""
        self.resnet.eval()
        self.resnet.to(memory_format=torch.channels_last)  # 20-35% faster convolutions on CPUs, tensor cores on GPUs
        self._folded: tuple = (None, None)  # (weights it was made from, fold_batchnorm(self.resnet)): see backbone

    def train(self, mode: bool = True) -> FrozenResNet:
        super().train(mode)
        self.resnet.eval()
        return self

    def conv_map(self, images: torch.Tensor) -> torch.Tensor:
        """The last convolutional block's output [B, 2048, H/32, W/32] for normalised images [B, 3, H, W]."""
        return self._run_resnet(images, pool=False)

    def backbone(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled ResNet-50 features [B, 2048] of normalised images [B, 3, H, W] (the ResNet's own average pool)."""
        return self._run_resnet(images, pool=True).flatten(1)

    def _run_resnet(self, images: torch.Tensor, pool: bool) -> torch.Tensor:
        """The ResNet with (`pool`) or without its final average pool. A frozen backbone (not `train_cnn`) runs
        with its BatchNorms folded into its convolutions (see `_folded_resnet`: edits through `.data` are not
        seen, call `refold()` after them)."""
        images = images.contiguous(memory_format=torch.channels_last)
        if self.train_cnn or self.resnet.training:  # an optimizer may change weights without a trace: no folding
            with torch.set_grad_enabled(self.train_cnn and torch.is_grad_enabled()):
                return self.resnet(images) if pool else self.resnet[:-1](images)
        with torch.no_grad():
            resnet = self._folded_resnet()
            return resnet(images) if pool else resnet[:-1](images)

    def grid_features(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """The last convolutional map average-pooled to grid x grid cells: [B, grid * grid, 2048], row by row."""
        return F.adaptive_avg_pool2d(self.conv_map(images), grid).flatten(2).transpose(1, 2)

    def _folded_resnet(self) -> nn.Sequential:
        """fold_batchnorm(self.resnet), made again when a weight was replaced or changed in place (.to(),
        load_state_dict; fused optimizers do not count as changes, hence none with train_cnn). Kept in a tuple, so
        it is no submodule: the state dict keeps the template's layout.

        A change is seen through each tensor's version counter, which edits through `.data` (`p.data.mul_(2)`)
        do not bump: after such an edit call `refold()`, or the old fold keeps being used.
        """
        tensors = [*self.resnet.parameters(), *self.resnet.buffers()]
        if any(t.is_inference() for t in tensors):
            # Weights made under torch.inference_mode have no version counter, and inside inference_mode they can
            # still be changed in place (load_state_dict copies into them) without a trace: a fold could go stale
            # unseen, so these run unfolded (5-10% slower, always right).
            self._folded = (None, None)
            return self.resnet
        key = tuple((t.device, t.data_ptr(), t._version, t.dtype) for t in tensors)
        if self._folded[0] != key:
            self._folded = (None, None)  # free the old copy before making the new one
            self._folded = (key, fold_batchnorm(self.resnet))
        return self._folded[1]

    def refold(self) -> None:
        """Fold the BatchNorms again on the next forward: needed after weight edits through `.data` (no trace)."""
        self._folded = (None, None)

    def backbone_fingerprint(self) -> str:
        """Hash of the backbone's weights: part of the feature cache's key."""
        digest = hashlib.sha256()
        for name, tensor in self.resnet.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


class EncoderCNN(FrozenResNet):
    """Frozen ResNet-50 -> 2048-d pooled feature -> Linear `embed` to the decoder's input size (the template's)."""

    feature_shape = (FEATURE_SIZE,)  # what `features` returns per image, and the feature cache stores

    def __init__(
        self,
        embed_size: int = 512,
        pretrained: bool = True,
        weights_path: str | os.PathLike | None = None,
        train_cnn: bool = False,
        backbone_seed: int = 0,
    ):
        super().__init__(pretrained, weights_path, train_cnn, backbone_seed)
        self.embed = nn.Linear(FEATURE_SIZE, embed_size)
        self._finish_backbone()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the feature cache stores for images: the pooled features [B, 2048]."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.backbone(images))


class GridEncoder(FrozenResNet):
    """Frozen ResNet-50 -> its last convolutional map pooled to grid x grid cells of 2048 values, standardised
    per channel: what AttentionDecoder attends over (Show, Attend and Tell's encoder).

    It has no trained layer: `feature_mean` / `feature_std` are the training features' statistics (train.py sets
    them), `grid_size` the grid the decoder was trained on; all three are in `encoder-N.pkl`, whose lack of
    `embed.weight` tells it from the pooled EncoderCNN's.
    """

    def __init__(
        self,
        grid: int = 7,
        pretrained: bool = True,
        weights_path: str | os.PathLike | None = None,
        train_cnn: bool = False,
        backbone_seed: int = 0,
    ):
        super().__init__(pretrained, weights_path, train_cnn, backbone_seed)
        self.register_buffer("grid_size", torch.tensor(grid))
        self.register_buffer("feature_mean", torch.zeros(FEATURE_SIZE))
        self.register_buffer("feature_std", torch.ones(FEATURE_SIZE))
        self._finish_backbone()

    @property
    def grid(self) -> int:
        return int(self.grid_size)

    @property
    def feature_shape(self) -> tuple[int, int]:
        return (self.grid**2, FEATURE_SIZE)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the feature cache stores for images: the raw grid [B, grid * grid, 2048]."""
        return self.grid_features(images, self.grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The standardised grid [B, grid * grid, 2048]: AttentionDecoder's `features`."""
        return (self.features(images) - self.feature_mean) / self.feature_std


class SearchMethods:
    """greedy_search / sample_search / beam_search as methods of a decoder (notebooks, the template's style);
    each is decoding.py's function of the same name, which explains the arguments."""

    def greedy_search(
        self, features: torch.Tensor, max_len: int = 20, end_id: int = END_ID, states=None
    ) -> list[list[int]]:
        """Most likely word at every step for a batch of images' features (`decoding.greedy_search`)."""
        return decoding.greedy_search(self, features, max_len, end_id, states)

    def sample_search(
        self,
        features: torch.Tensor,
        temperature: float = 1.0,
        top_k: int = 0,
        max_len: int = 20,
        end_id: int = END_ID,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Random captions drawn for a batch of images' features (`decoding.sample_search`)."""
        return decoding.sample_search(self, features, temperature, top_k, max_len, end_id, generator)

    def beam_search(
        self,
        features: torch.Tensor,
        beam_size: int = 3,
        max_len: int = 20,
        length_penalty: float = 0.0,
        top_n: int | None = None,
        end_id: int = END_ID,
    ) -> list[list[int]] | list[list[tuple[list[int], float]]]:
        """Beam search over a batch of images' features (`decoding.beam_search`)."""
        return decoding.beam_search(self, features, beam_size, max_len, length_penalty, top_n, end_id)


class DecoderRNN(SearchMethods, nn.Module):
    """LSTM language model conditioned on the image: the image embedding is its first input.

    Decoding (all batched over images, all in decoding.py on `init_state` / `decode_step` / `reorder_state`):
    `greedy_search`, `beam_search`, `sample_search`, and the template's one-image `sample`. They return generated
    ids as the template's `sample()` does: starting with the model's first prediction (for a trained model that is
    <start>) and ending with <end> when it was generated, never before a word other than <start>
    (`forbid_empty_caption`); `Vocabulary.decode` turns them into words.

    Its decoding state is (the pending first input [N, E] or None once fed, the LSTM's (h, c) or None at first).
    """

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

    def init_state(self, features: torch.Tensor, states=None) -> tuple:
        """decoding.py's start: the image embeddings [B, E] wait to be fed first, after the LSTM states if given."""
        return features, states

    def decode_step(self, tokens: torch.Tensor | None, state: tuple) -> tuple[torch.Tensor, tuple]:
        """decoding.py's step: feeds the pending input when `tokens` is None, else the embedded tokens [N]."""
        pending, states = state
        logits, states = self.step(pending if tokens is None else self.embed(tokens), states)
        return logits, (None, states)

    def reorder_state(self, state: tuple, indices: torch.Tensor) -> tuple:
        """decoding.py's beam bookkeeping: rows `indices` of the pending input and of h, c (their dim 1)."""
        pending, states = state
        if pending is not None:
            pending = pending.index_select(0, indices)
        if states is not None:
            states = tuple(s.index_select(1, indices) for s in states)
        return pending, states

    def sample(self, inputs: torch.Tensor, states=None, max_len: int = 20) -> list[int]:
        """The template's greedy decoding of one image embedding ([1, 1, E]): predicted ids, up to <end>."""
        return self.greedy_search(inputs.reshape(1, -1), max_len, states=states)[0]


class Attention(nn.Module):
    """Additive (Bahdanau) attention: a weight per grid cell from its features and the decoder's hidden state."""

    def __init__(self, feature_size: int, hidden_size: int, attention_size: int):
        super().__init__()
        self.encoder_att = nn.Linear(feature_size, attention_size)  # applied once per image (`project`)
        self.decoder_att = nn.Linear(hidden_size, attention_size)
        self.full_att = nn.Linear(attention_size, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The cells' side of the scores [N, P, A]: it does not change while a caption is written."""
        return self.encoder_att(features)

    def forward(self, features: torch.Tensor, projected: torch.Tensor, hidden: torch.Tensor):
        """The context [N, F] (the cells' features weighted by attention) and the weights alpha [N, P] (sum 1)."""
        scores = self.full_att(torch.tanh(projected + self.decoder_att(hidden).unsqueeze(1))).squeeze(2)
        alpha = scores.float().softmax(1).to(features.dtype)
        return torch.bmm(alpha.unsqueeze(1), features).squeeze(1), alpha


class AttentionDecoder(SearchMethods, nn.Module):
    """Show, Attend and Tell's decoder: an LSTM cell that, before each word, attends over the image's grid.

    h0 and c0 come from the mean of the grid's features; at every step the attention's context, scaled by a gate
    sigmoid(f_beta(h)), is fed to the LSTM cell beside the previous word's embedding (a zero vector before the
    first word, whose prediction is <start>, as DecoderRNN's). Dropout sits before the output layer.
    `forward` returns the logits and every step's attention weights, for the doubly stochastic penalty
    (`attention_penalty`). Its decoding state is (h, c, the grid features, their projection for the attention,
    the image each row belongs to): beam search's reorders keep each image's beams among its own rows, so the
    grid (5,000 images x 3 beams x 49 x 2048 values) is copied only when a row changes image.
    """

    def __init__(self, attention_size: int, embed_size: int, hidden_size: int, vocab_size: int,
                 feature_size: int = FEATURE_SIZE, dropout: float = 0.5):
        super().__init__()
        self.attention_size, self.embed_size, self.hidden_size = attention_size, embed_size, hidden_size
        self.vocab_size, self.feature_size = vocab_size, feature_size
        self.attention = Attention(feature_size, hidden_size, attention_size)
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTMCell(embed_size + feature_size, hidden_size)
        self.init_h = nn.Linear(feature_size, hidden_size)
        self.init_c = nn.Linear(feature_size, hidden_size)
        self.f_beta = nn.Linear(hidden_size, feature_size)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing over grid features [B, P, F]: logits [B, L, V] predicting w0 .. w(L-1) from the inputs
        [nothing, w0 .. w(L-2)], and the attention weights [B, L, P] of every step."""
        state = self.init_state(features)
        embedded = self.embed(captions[:, :-1])
        inputs = torch.cat((embedded.new_zeros(len(captions), 1, self.embed_size), embedded), 1)
        logits, alphas = [], []
        for t in range(captions.shape[1]):
            step_logits, alpha, state = self.advance(inputs[:, t], state)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)

    def init_state(self, features: torch.Tensor, states=None) -> tuple:
        """decoding.py's start: (h, c) from the grid's mean (or the given `states`), the grid and its projection."""
        mean = features.mean(1)
        h, c = (self.init_h(mean), self.init_c(mean)) if states is None else states
        images = torch.arange(len(features), device=features.device)
        return h, c, features, self.attention.project(features), images

    def advance(self, inputs: torch.Tensor, state: tuple) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """One step from word embeddings [N, E]: logits [N, V], the attention weights [N, P], the next state."""
        h, c, features, projected, images = state
        context, alpha = self.attention(features, projected, h)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.lstm(torch.cat((inputs, context.to(inputs.dtype)), 1), (h, c))
        return self.fc(self.dropout(h)), alpha, (h, c, features, projected, images)

    def decode_step(self, tokens: torch.Tensor | None, state: tuple) -> tuple[torch.Tensor, tuple]:
        """decoding.py's step: the previous words [N] (None before the first: a zero embedding)."""
        if tokens is None:
            inputs = self.embed.weight.new_zeros(len(state[0]), self.embed_size)
        else:
            inputs = self.embed(tokens)
        logits, _, state = self.advance(inputs, state)
        return logits, state

    def reorder_state(self, state: tuple, indices: torch.Tensor) -> tuple:
        """decoding.py's beam bookkeeping: rows `indices` of the state; the grid and its projection only when
        a row now holds another image than before (one host sync)."""
        h, c, features, projected, images = state
        moved = images.index_select(0, indices)
        if moved.shape != images.shape or not torch.equal(moved, images):
            features, projected = features.index_select(0, indices), projected.index_select(0, indices)
        return h.index_select(0, indices), c.index_select(0, indices), features, projected, moved

    @torch.no_grad()
    def attention_maps(self, features: torch.Tensor, captions: list[list[int]]) -> list[torch.Tensor]:
        """Per image the attention weights [len(ids), P] with which each id of its caption was written (by any
        search: decoding is deterministic, so re-reading the caption gives the weights the search saw)."""
        maps = []
        for row, ids in enumerate(captions):
            tokens = torch.tensor([ids], dtype=torch.long, device=features.device)
            maps.append(self(features[row : row + 1], tokens)[1][0].float().cpu())
        return maps


def attention_penalty(alphas: torch.Tensor) -> torch.Tensor:
    """Show, Attend and Tell's doubly stochastic regulariser ((1 - sum over steps of alpha)^2).mean(): every cell
    should receive about one unit of attention over the whole caption. `alphas` [B, L, P]."""
    return ((1.0 - alphas.float().sum(1)) ** 2).mean()


# ---------------------------------------------------------------------------------------------------------------
# Loading published weights: encoder-N.pkl / decoder-N.pkl / vocab.pkl of this project and of the CVND family
# ---------------------------------------------------------------------------------------------------------------

TRAIN_CONFIG = "train_config.json"


class WeightsFileError(ValueError):
    """A weights file that cannot or must not be loaded; the message names the file and says why in one line."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `torch.save(module.state_dict())` file (zip or PyTorch 0.4 legacy format), on the CPU.

    Loads with `weights_only=True`: a file that needs full unpickling could run any code and is refused.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: file not found") from None
    except OSError as e:
        raise WeightsFileError(f"{path}: cannot read ({e.strerror})") from None
    if head.startswith(b"version https://git-lfs"):
        raise WeightsFileError(
            f"{path}: this is a Git LFS pointer, not the weights; run `git lfs pull` to fetch them"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))  # weights_only met a class or function it will not call
        if refused:
            raise WeightsFileError(
                f"{path}: needs full unpickling (it references {refused.group(1)}), which can run arbitrary code, "
                "so it is not loaded for safety; if you trust it, re-save its state_dict() with torch.save"
            ) from None
        raise WeightsFileError(f"{path}: truncated or corrupt weights file (not a readable pickle)") from None
    except EOFError:
        raise WeightsFileError(f"{path}: truncated or corrupt weights file (it ends early)") from None
    except OSError:  # the file was readable above: this is torch failing to parse it
        raise WeightsFileError(
            f"{path}: truncated or corrupt weights file (not a complete archive)"
        ) from None
    except Exception as e:
        lines = str(e).strip().splitlines()
        reason = lines[0].split(". ")[0] if lines else type(e).__name__
        raise WeightsFileError(f"{path}: truncated or corrupt weights file ({reason})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsFileError(f"{path}: not a state dict (a dict of tensors), got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> EncoderCNN | GridEncoder:
    """The encoder of an `encoder-N.pkl`, in eval mode on `device`: an EncoderCNN (the template's: it has
    `embed.weight`) or the attention model's GridEncoder (it has `grid_size` and the feature statistics).

    The embed size comes from `embed.weight`; BatchNorm counters missing from old files start at 0 (BatchNorm's
    own loading does that); `image_size` comes from a train_config.json beside the file (else 224).
    """
    path = Path(path)
    state = read_state_dict(path)
    image_size = read_image_size(path.parent)
    if any(k.endswith("weight_ih_l0") or k.startswith("attention.") for k in state):
        raise WeightsFileError(f"{path}: this is a decoder weights file (it has LSTM or attention weights), not an "
                               "encoder")
    encoder = _grid_encoder_like(state, path) if "grid_size" in state else _pooled_encoder_like(state, path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        encoder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsFileError(f"{path}: not a ResNet-50 encoder of this layout ({_mismatch(e)})") from None
    encoder.image_size = image_size
    return encoder.to(resolve_device(device)).eval()


def _pooled_encoder_like(state: dict[str, torch.Tensor], path: Path) -> EncoderCNN:
    """An EncoderCNN on the meta device (no random init of 25M weights about to be replaced) shaped as `state`."""
    embed = state.get("embed.weight")
    if embed is None or embed.dim() != 2 or embed.shape[1] != FEATURE_SIZE or "embed.bias" not in state:
        raise WeightsFileError(f"{path}: not an encoder weights file (needs embed.weight of shape [E, 2048], or "
                               "grid_size for an attention model's encoder)")
    if not any(k.startswith("resnet.") for k in state):
        raise WeightsFileError(f"{path}: not an encoder weights file (no resnet.* backbone weights)")
    with torch.device("meta"):
        return EncoderCNN(embed.shape[0], pretrained=False)


def _grid_encoder_like(state: dict[str, torch.Tensor], path: Path) -> GridEncoder:
    """A GridEncoder on the meta device shaped as `state` (its grid size read from `grid_size`)."""
    if not any(k.startswith("resnet.") for k in state):
        raise WeightsFileError(f"{path}: not an encoder weights file (no resnet.* backbone weights)")
    grid = state["grid_size"]
    if grid.dim() != 0 or grid.is_floating_point() or int(grid) < 1:
        raise WeightsFileError(f"{path}: grid_size must be a positive integer, not {grid.tolist()!r}")
    with torch.device("meta"):
        return GridEncoder(int(grid), pretrained=False)


def load_decoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> DecoderRNN | AttentionDecoder:
    """The decoder of a `decoder-N.pkl`, in eval mode on `device`: an AttentionDecoder when it has `attention.*`
    weights, else a DecoderRNN.

    Sizes and layer count are read from the shapes. The embedding (the one layer with only a [V, E] weight) and the
    output layer (the one with a [V, H] weight and a [V] bias) of an LSTM decoder are found by role and shape, so
    the names used in the CVND family (`embed`, `word_embeddings`, `embedding`, `caption_embeddings`; `fc`,
    `hidden2vocab`, `linear`, `FC`) all load.
    """
    path = Path(path)
    state = read_state_dict(path)
    if any(k.startswith("resnet.") for k in state):
        raise WeightsFileError(
            f"{path}: this is an encoder weights file (it has resnet.* weights), not a decoder"
        )
    if any(k.startswith("attention.") for k in state):
        decoder = _attention_decoder_like(state, path)
    else:
        lstm, num_layers, embed_size, hidden_size = _find_lstm(state, path)
        embedding, output = _find_embedding_and_output(state, lstm, embed_size, hidden_size, path)
        state = _renamed_decoder_state(state, lstm, num_layers, hidden_size, embedding, output)
        decoder = DecoderRNN(embed_size, hidden_size, embedding["weight"].shape[0], num_layers)
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        kind = "an attention" if isinstance(decoder, AttentionDecoder) else "an LSTM"
        raise WeightsFileError(f"{path}: not {kind} decoder of this layout ({_mismatch(e)})") from None
    return decoder.to(resolve_device(device)).eval()


def _attention_decoder_like(state: dict[str, torch.Tensor], path: Path) -> AttentionDecoder:
    """An AttentionDecoder with the sizes that `state`'s shapes say (its weights are loaded by the caller)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        attention_size, feature_size = shapes["attention.encoder_att.weight"]
        vocab_size, embed_size = shapes["embed.weight"]
        hidden_size = shapes["lstm.weight_hh"][1]
    except (KeyError, ValueError):
        raise WeightsFileError(f"{path}: not an attention decoder of this layout (needs attention.encoder_att, "
                               "embed and lstm weights of 2 dimensions)") from None
    return AttentionDecoder(attention_size, embed_size, hidden_size, vocab_size, feature_size)


def _find_lstm(state: dict[str, torch.Tensor], path: Path) -> tuple[str, int, int, int]:
    """The LSTM's key prefix (e.g. "lstm."), layer count, input (embed) and hidden sizes; refuses other RNNs."""
    lstm = next((k.removesuffix("weight_ih_l0") for k in state if k.endswith("weight_ih_l0")), None)
    if lstm is None:
        raise WeightsFileError(
            f"{path}: not a decoder weights file (no LSTM weights such as lstm.weight_ih_l0)"
        )
    if any(k.startswith(lstm) and k.endswith("_reverse") for k in state):
        raise WeightsFileError(f"{path}: has a bidirectional LSTM, which a caption decoder cannot use")
    num_layers = 0
    while f"{lstm}weight_ih_l{num_layers}" in state:
        num_layers += 1
    embed_size, hidden_size = state[f"{lstm}weight_ih_l0"].shape[1], state[f"{lstm}weight_hh_l0"].shape[1]
    if state[f"{lstm}weight_ih_l0"].shape[0] != 4 * hidden_size:
        raise WeightsFileError(f"{path}: the recurrent layer is not an LSTM (a GRU or RNN?)")
    return lstm, num_layers, embed_size, hidden_size


def _is_embedding(params: dict[str, torch.Tensor], embed_size: int) -> bool:
    """Whether a layer's parameters are a word embedding: only a [V, embed_size] weight."""
    return (
        params.keys() == {"weight"}
        and params["weight"].dim() == 2
        and params["weight"].shape[1] == embed_size
    )


def _is_output(params: dict[str, torch.Tensor], hidden_size: int) -> bool:
    """Whether a layer's parameters are the output layer: a [V, hidden_size] weight and a [V] bias."""
    return (
        params.keys() == {"weight", "bias"}
        and params["weight"].dim() == 2
        and params["weight"].shape[1] == hidden_size
        and params["bias"].shape == params["weight"].shape[:1]
    )


def _find_embedding_and_output(
    state: dict[str, torch.Tensor], lstm: str, embed_size: int, hidden_size: int, path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The parameters of the embedding and of the output layer, found by role whatever their names; refuses a
    vocabulary size mismatch between them and any other layer."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(lstm):
            module, _, name = key.rpartition(".")
            layers.setdefault(module, {})[name] = tensor
    is_embedding = functools.partial(_is_embedding, embed_size=embed_size)
    embedding = _find_layer(layers, is_embedding, "word embedding", path)
    output = _find_layer(layers, functools.partial(_is_output, hidden_size=hidden_size), "output layer", path)
    vocab_size = layers[embedding]["weight"].shape[0]
    if layers[output]["weight"].shape[0] != vocab_size:
        raise WeightsFileError(
            f"{path}: the embedding has {vocab_size} words but the output layer {layers[output]['weight'].shape[0]}"
        )
    extra = sorted(set(layers) - {embedding, output})
    if extra:
        raise WeightsFileError(f"{path}: has layers this DecoderRNN does not have: {', '.join(extra)}")
    return layers[embedding], layers[output]


def _renamed_decoder_state(
    state: dict[str, torch.Tensor],
    lstm: str,
    num_layers: int,
    hidden_size: int,
    embedding: dict[str, torch.Tensor],
    output: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The weights under DecoderRNN's names (embed, lstm, fc)."""
    renamed = {"embed.weight": embedding["weight"], "fc.weight": output["weight"], "fc.bias": output["bias"]}
    for layer in range(num_layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            key = f"{name}_l{layer}"
            # An LSTM saved with bias=False is the same as one with zero biases.
            renamed[f"lstm.{key}"] = state.get(f"{lstm}{key}", torch.zeros(4 * hidden_size))
    return renamed


def _find_layer(layers: dict, fits, role: str, path: Path) -> str:
    """The one layer whose parameters fit `role`, whatever its name."""
    fitting = [name for name, params in layers.items() if fits(params)]
    if len(fitting) == 1:
        return fitting[0]
    found = f"candidates {', '.join(fitting)}" if fitting else f"layers {', '.join(layers) or 'none'}"
    raise WeightsFileError(f"{path}: cannot tell which layer is the {role} ({found})")


def _mismatch(error: RuntimeError) -> str:
    """The first line of load_state_dict's complaint, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__
    return text[:300]


def read_image_size(folder: str | os.PathLike) -> int:
    """The crop size recorded in `folder/train_config.json` by train.py, or 224 when there is none."""
    path = Path(folder) / TRAIN_CONFIG
    if not path.exists():
        return EncoderCNN.image_size
    try:
        size = json.loads(path.read_text()).get("image_size", EncoderCNN.image_size)
    except (OSError, ValueError, AttributeError) as e:
        raise WeightsFileError(f"{path}: not a readable training config ({e})") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise WeightsFileError(f"{path}: image_size must be a positive integer, not {size!r}")
    return size


def load_pretrained(
    encoder_path: str | os.PathLike,
    decoder_path: str | os.PathLike,
    vocab_path: str | os.PathLike,
    device: str | torch.device = "cpu",
) -> tuple[EncoderCNN | GridEncoder, DecoderRNN | AttentionDecoder, Vocabulary]:
    """Encoder, decoder (eval mode, on `device`) and vocabulary of saved weights, checked against each other:
    either kind of model (pooled LSTM or attention), told apart by the files' keys."""
    device = resolve_device(device)
    vocab = Vocabulary.load(vocab_path)
    decoder = load_decoder(decoder_path, device)
    if len(vocab) != decoder.vocab_size:
        raise WeightsFileError(
            f"{vocab_path}: has {len(vocab)} words but {decoder_path} predicts {decoder.vocab_size}; a rebuilt "
            "vocabulary garbles captions, use the vocab.pkl the model was trained with"
        )
    encoder = load_encoder(encoder_path, device)
    check_pairing(encoder, decoder, encoder_path, decoder_path)
    return encoder, decoder, vocab


def check_pairing(encoder: EncoderCNN | GridEncoder, decoder: DecoderRNN | AttentionDecoder,
                  encoder_path: str | os.PathLike, decoder_path: str | os.PathLike) -> None:
    """Refuse, naming the encoder file, an encoder whose output the decoder cannot take."""
    if isinstance(decoder, AttentionDecoder) and not isinstance(encoder, GridEncoder):
        raise WeightsFileError(f"{encoder_path}: a pooled-feature encoder (it has embed.weight), but {decoder_path} "
                               "is an attention decoder, which needs the grid encoder saved beside it")
    if isinstance(encoder, GridEncoder) and not isinstance(decoder, AttentionDecoder):
        raise WeightsFileError(f"{encoder_path}: an attention model's grid encoder, but {decoder_path} is an LSTM "
                               "decoder, which needs the pooled encoder (with embed.weight) saved beside it")
    if isinstance(decoder, AttentionDecoder) and decoder.feature_size != FEATURE_SIZE:
        raise WeightsFileError(f"{decoder_path}: attends over {decoder.feature_size}-d cells, but the ResNet-50 "
                               f"grid of {encoder_path} has {FEATURE_SIZE}")
    if isinstance(encoder, EncoderCNN) and encoder.embed.out_features != decoder.embed_size:
        raise WeightsFileError(
            f"{encoder_path}: embeds images to {encoder.embed.out_features} values but {decoder_path} expects "
            f"{decoder.embed_size}; are they from the same training run?"
        )


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is the GPU when there is one (CUDA, then Apple MPS), else the CPU; other names are checked."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        last = torch.cuda.device_count() - 1
        present = "one CUDA device, cuda:0" if last == 0 else f"the CUDA devices cuda:0 to cuda:{last}"
        raise ValueError(f"device {device} asked for, but this machine has only {present}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device} asked for, but Apple MPS is not available here")
    return device


def save_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """`torch.save(module.state_dict())` to `path` atomically (temp file + rename), as the template's pickles."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_torch_save(state, path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a temp file in the same folder and a rename: a crash never leaves a torn file."""
    with atomic_write(path) as f:
        torch.save(obj, f)


# ---------------------------------------------------------------------------------------------------------------
# Training: encoder and decoder as one module
# ---------------------------------------------------------------------------------------------------------------


class Captioner(nn.Module):
    """Encoder and decoder as one module, so DistributedDataParallel sees every trainable parameter.

    The decoder trains on standardised ResNet features, (x - feature_mean) / feature_std: the pooled features of a
    random ResNet share a large common offset (mean ~11, spread ~2 on the sample set), and a linear probe trained
    on them with Adam stays at chance for colour where one on standardised features gets 80%. `encoder_state`
    puts the standardisation into the saved encoder: folded into `embed` for EncoderCNN, so it maps raw features
    exactly as the template's; as GridEncoder's feature_mean / feature_std for the attention decoder.
    """

    def __init__(self, encoder: EncoderCNN | GridEncoder, decoder: DecoderRNN | AttentionDecoder):
        super().__init__()
        if isinstance(decoder, AttentionDecoder) != isinstance(encoder, GridEncoder):
            raise ValueError("AttentionDecoder takes a GridEncoder's features, DecoderRNN an EncoderCNN's")
        self.encoder, self.decoder = encoder, decoder
        self.register_buffer("feature_mean", torch.zeros(FEATURE_SIZE))
        self.register_buffer("feature_std", torch.ones(FEATURE_SIZE))

    def forward(self, captions: torch.Tensor, features: torch.Tensor | None = None,
                images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, L, V] from cached ResNet features (`encoder.feature_shape` per image) or from images
        [B, 3, S, S]; and the attention weights [B, L, P] of an attention decoder (None for DecoderRNN)."""
        if images is not None:
            features = self.encoder.features(images)
        standardised = (features - self.feature_mean) / self.feature_std
        if isinstance(self.decoder, AttentionDecoder):
            return self.decoder(standardised, captions)
        return self.decoder(self.encoder.embed(standardised), captions), None

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's state dict on the CPU with the standardisation in it (the keys of its class)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        if isinstance(self.encoder, GridEncoder):
            state["feature_mean"], state["feature_std"] = self.feature_mean.cpu(), self.feature_std.cpu()
            return state
        weight = state["embed.weight"].double() / self.feature_std.cpu().double()
        state["embed.bias"] = (state["embed.bias"].double() - weight @ self.feature_mean.cpu().double()).float()
        state["embed.weight"] = weight.float()
        return state

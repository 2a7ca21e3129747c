"""Annotators: networks that score every location of an image, the source of dense label maps.

An annotator maps normalised images ``[B, 3, H, W]`` to dense logits ``[B, C, h, w]``:

- :class:`LVViTAnnotator`: an LV-ViT's ``aux_head`` on every patch token (h, w = the token grid);
- :class:`CNNAnnotator`: a CNN classifier whose head is global average pooling followed by one
  Linear layer (``paddle.vision.models`` ResNets, MobileNetV2, ShuffleNetV2, DenseNet, or the
  :class:`SmallCNN` below). Because pooling and a Linear layer commute, applying the Linear layer
  at every position of the last feature map (its 1x1-convolution view) gives per-location logits
  whose spatial mean is exactly the classifier's output.

``cnn_classifier`` is registered in MODELS so that tools/train.py trains a CNN
annotator on image-level labels like any other model.
"""
import paddle
import paddle.nn as nn

from passl.errors import CheckpointError, ConfigError
from passl.models.outputs import TokenLabelOutput
from passl.ranges import PositiveInt
from passl.registry import MODELS

__all__ = ["SmallCNN", "CNNClassifier", "build_cnn", "CNNAnnotator", "LVViTAnnotator", "load_cnn_weights",
           "build_cnn_annotator", "build_lvvit_annotator"]


def _conv_bn_relu(in_chans, out_chans, stride):
    return [nn.Conv2D(in_chans, out_chans, 3, stride=stride, padding=1, bias_attr=False),
            nn.BatchNorm2D(out_chans), nn.ReLU()]


class SmallCNN(nn.Layer):
    """A 7-layer CNN of stride 8 (receptive field 44 px) for small images: an 80x64 image gives a
    10x8 feature map. forward: images [B, 3, H, W] -> logits [B, C] (average pool, then ``fc``)."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        layers = []
        for in_chans, out_chans, stride in [(3, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1),
                                            (2 * width, 4 * width, 2), (4 * width, 4 * width, 1),
                                            (4 * width, 4 * width, 2), (4 * width, 4 * width, 1)]:
            layers += _conv_bn_relu(in_chans, out_chans, stride)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, images):
        """images [B, 3, H, W] -> logits [B, num_classes]"""
        return self.fc(self.avgpool(self.features(images)).flatten(1))


def _vision_archs():
    import paddle.vision.models as models
    return sorted(name for name in dir(models) if name[0].islower() and callable(getattr(models, name)))


def build_cnn(arch="small_cnn", num_classes=1000, width=16):
    """A randomly initialised CNN classifier: ``small_cnn`` (of ``width``) or a ``paddle.vision.models``
    factory name such as ``resnet18`` (never downloads weights). Returns a Layer: [B, 3, H, W] -> [B, C]."""
    if arch == "small_cnn":
        return SmallCNN(num_classes, width)
    import paddle.vision.models as models
    factory = getattr(models, arch, None) if arch in _vision_archs() else None
    if factory is None:
        raise ConfigError(f"annotator arch '{arch}' is unknown; use small_cnn or a paddle.vision.models name "
                          f"with one Linear classifier, e.g. resnet18, resnet50, mobilenet_v2, shufflenet_v2_x1_0")
    return factory(pretrained=False, num_classes=num_classes)


@MODELS.register("cnn_classifier")
class CNNClassifier(nn.Layer):
    """A CNN annotator as a trainable model: ``net`` = build_cnn(arch, num_classes, width).

    forward: images [B, 3, H, W] -> ``TokenLabelOutput(logits [B, num_classes])`` in training mode (no
    aux logits: the loss uses the class target only), the logits in eval mode. ``grid_size``
    (1, 1): one target per image. ``img_size`` None: it takes any input size, so its transforms state
    their sizes.
    """

    def __init__(self, arch: str = "small_cnn", num_classes: PositiveInt = 1000, width: PositiveInt = 16):
        super().__init__()
        self.arch, self.num_classes, self.grid_size, self.img_size = arch, num_classes, (1, 1), None
        self.num_tokens = 1
        self.net = build_cnn(arch, num_classes, width)

    def no_weight_decay(self):
        return set()   # the optimizer already spares 1-D parameters (biases, norms)

    def reset_heads(self):
        """Re-initialise the classifier (the last Linear layer) as Paddle initialises a new one."""
        classifier = [layer for layer in self.net.sublayers() if isinstance(layer, nn.Linear)][-1]
        fresh = nn.Linear(*classifier.weight.shape)
        classifier.weight.set_value(fresh.weight)
        if classifier.bias is not None:
            classifier.bias.set_value(fresh.bias)

    def forward(self, images):
        """images [B, 3, H, W] -> TokenLabelOutput(logits [B, num_classes]) in training, else the logits"""
        logits = self.net(images)
        return TokenLabelOutput(logits) if self.training else logits


class _Captured(Exception):
    def __init__(self, features):
        super().__init__("features captured")
        self.features = features


class CNNAnnotator:
    """Dense logits from a CNN classifier: its classifier Linear applied at every position of the
    feature map that enters its global average pool. ``net``: eval-mode Layer whose last
    ``AdaptiveAvgPool2D`` is followed by one ``Linear`` (the classifier)."""

    record = None   # what the annotator is ({kind, arch, num_classes, weights}); build_cnn_annotator sets it

    def __init__(self, net, name="cnn"):
        self.net, self.name = net, name
        linears = [layer for layer in net.sublayers() if isinstance(layer, nn.Linear)]
        pools = [layer for layer in net.sublayers() if isinstance(layer, nn.AdaptiveAvgPool2D)]
        if not linears or not pools:
            raise ConfigError(f"annotator {name}: needs a global average pool and a Linear classifier "
                              "(found none); use e.g. resnet18, mobilenet_v2 or small_cnn")
        self.fc, self.pool = linears[-1], pools[-1]
        self.num_classes = int(self.fc.weight.shape[1])
        net.eval()

    def _features(self, images):
        def hook(layer, inputs):
            raise _Captured(inputs[0])
        handle = self.pool.register_forward_pre_hook(hook)
        try:
            self.net(images)
        except _Captured as captured:
            return captured.features
        finally:
            handle.remove()
        raise ConfigError(f"annotator {self.name}: its pooling layer was never reached")

    @paddle.no_grad()
    def __call__(self, images):
        """images [B, 3, H, W] normalised -> dense logits [B, C, h, w] (h, w: the last feature map)."""
        features = self._features(images)                         # [B, D, h, w]
        weight = self.fc.weight                                   # [D, C]: Paddle Linear is (in, out)
        if features.ndim != 4 or features.shape[1] != weight.shape[0]:
            raise ConfigError(f"annotator {self.name}: the classifier takes {weight.shape[0]} inputs but the "
                              f"pooled feature map has shape {list(features.shape)}; only a single Linear after "
                              "global average pooling can be applied per position (not VGG / MobileNetV3)")
        logits = paddle.einsum("bdhw,dc->bchw", features.astype("float32"), weight.astype("float32"))
        if self.fc.bias is not None:
            logits = logits + self.fc.bias.astype("float32").reshape([1, -1, 1, 1])
        return logits


class LVViTAnnotator:
    """Dense logits from an LV-ViT: ``aux_head`` on every patch token after the final LayerNorm."""

    record = None   # what the annotator is ({kind, model, weights}); build_lvvit_annotator sets it

    def __init__(self, model, name="lvvit"):
        self.model, self.name = model, name
        self.num_classes = int(model.num_classes)
        model.eval()

    @paddle.no_grad()
    def __call__(self, images):
        """images [B, 3, H, W] (the model's img_size) -> dense logits [B, C, H/16, W/16]."""
        tokens = self.model.forward_features(images)[:, 1:]      # [B, N, D]
        aux = self.model.aux_head(tokens)                         # [B, N, C]
        rows, cols = self.model.grid_size
        return aux.transpose([0, 2, 1]).reshape([0, self.num_classes, rows, cols])


def _read_state(path):
    """Paddle-layout state dict {key: numpy array} from any weights file passl.io reads (.pdparams,
    .pdckpt: its best weights, .safetensors, .pth); never runs code from the file."""
    import os

    from passl.models.convert import read_weights
    if not os.path.isfile(path):
        raise CheckpointError(f"annotator weights not found: {path}")
    return read_weights(path)


def load_cnn_weights(net, path):
    """Load ``path`` into ``net`` strictly. Accepts the CNN's own state dict or one saved by
    tools/train.py for ``cnn_classifier`` (keys prefixed ``net.``). CheckpointError lists what does not fit."""
    state = _read_state(path)
    own = net.state_dict()
    fixed = {}
    for key, value in state.items():
        for prefix in ("_layers.", "module.", "net."):
            if key.startswith(prefix) and key[len(prefix):] in own:
                key = key[len(prefix):]
        fixed[key] = value
    missing = [k for k in own if k not in fixed]
    unexpected = [k for k in fixed if k not in own]
    mismatched = [f"{k}: file {list(fixed[k].shape)} vs model {list(own[k].shape)}"
                  for k in fixed if k in own and list(fixed[k].shape) != list(own[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{path} does not fit the annotator: missing {missing[:8]}, unexpected "
                              f"{unexpected[:8]}, shape mismatch {mismatched[:8]}; check --arch, --num-classes "
                              "(and --width for small_cnn)")
    net.set_state_dict(fixed)


def build_cnn_annotator(arch, num_classes, weights, width=16):
    """CNNAnnotator for ``arch`` (small_cnn or a paddle.vision.models name) with the user's ``weights``.
    Its ``record`` says what it is (generate_label_maps keeps it beside the maps it writes)."""
    import os
    net = build_cnn(arch, num_classes, width)
    load_cnn_weights(net, weights)
    annotator = CNNAnnotator(net, arch)
    annotator.record = {"kind": "cnn", "arch": arch, "num_classes": int(num_classes),
                        **({"width": int(width)} if arch == "small_cnn" else {}), "weights": os.path.abspath(weights)}
    return annotator


def build_lvvit_annotator(model_cfg, weights):
    """LVViTAnnotator from a config's ``model:`` section and weights (.pdparams / .pdckpt / .pth /
    .safetensors)."""
    import passl
    from passl.models import load_pretrained
    import os
    model = passl.build_model(model_cfg)
    load_pretrained(model, weights, log=lambda *a: None)
    annotator = LVViTAnnotator(model, model_cfg.get("name", "lvvit"))
    annotator.record = {"kind": "model", "model": dict(model_cfg), "weights": os.path.abspath(weights)}
    return annotator

"""The torchvision family: ResNet, VGG, AlexNet and SqueezeNet by name. Preprocessing comes from torchvision's weight
transforms, except SqueezeNet 1.1 from the ``ndf`` package, whose Caffe-trained weights define their own input.
torchvision is imported when a backbone is built or its download named, not when the family registers."""

from __future__ import annotations

from typing import Any

from featcache.backbones.registry import (
    CNN_LAYER_POOLS,
    BackboneFamily,
    BackboneSpec,
    load_strict,
    register_backbone,
    register_family,
)

# torchvision's own default tag, except ResNet-50 whose V1 weights are the classic frozen baseline.
_WEIGHT_TAGS = {"resnet50": "IMAGENET1K_V1"}


def torchvision_weights(arch: str) -> Any:
    """The torchvision weights enum member featcache uses for ``arch``."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    return enum[_WEIGHT_TAGS[arch]] if arch in _WEIGHT_TAGS else enum.DEFAULT


class TorchvisionFamily(BackboneFamily):
    library = "torchvision"
    host = "download.pytorch.org"

    def download_url(self, spec: BackboneSpec) -> str | None:
        return torchvision_weights(spec.arch).url

    def published_sha_prefix(self, spec: BackboneSpec) -> str | None:
        """torchvision names files ``<arch>-<first 8 hex of SHA-256>.pth``."""
        url = self.download_url(spec)
        return url.rsplit("/", 1)[-1].rsplit(".", 1)[0].rsplit("-", 1)[-1] if url else None

    def build(self, spec: BackboneSpec) -> Any:
        import torchvision

        return torchvision.models.get_model(spec.arch, weights=None)

    def download(self, spec: BackboneSpec, net: Any) -> str:
        state = torchvision_weights(spec.arch).get_state_dict(progress=False, check_hash=True)
        load_strict(net, state, f"torchvision download of {spec.arch}")
        return f"torchvision:{torchvision_weights(spec.arch)}"

    def preprocess(self, spec: BackboneSpec, net: Any, origin: str) -> Any:
        from torchvision.transforms import InterpolationMode

        from featcache.data.images import Preprocess

        if spec.package_weights == "squeezenet_ndf" and origin.startswith("package:ndf"):
            # Caffe-trained: 0-255 input minus the Caffe mean (the converter already made it RGB).
            caffe_mean_rgb = (123.68 / 255, 116.779 / 255, 103.939 / 255)
            return Preprocess(224, 256, "bilinear", caffe_mean_rgb, (1 / 255,) * 3)
        tf = torchvision_weights(spec.arch).transforms()
        interp = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}
        return Preprocess(tf.crop_size[0], tf.resize_size[0], interp[tf.interpolation], tuple(tf.mean), tuple(tf.std))

    def pool(self, spec: BackboneSpec, net: Any, x: Any, pools: tuple[str, ...]) -> dict:
        import torch

        from featcache.backbones.pooling import layer_pools

        layers = set(pools) & CNN_LAYER_POOLS
        if spec.arch.startswith("resnet"):
            for layer in (net.conv1, net.bn1, net.relu, net.maxpool):
                x = layer(x)
            stages = []
            for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
                x = layer(x)
                stages.append(x)
            return layer_pools(x, stages[:-1]) if layers else {"gap": x.mean(dim=(2, 3))}
        if layers:  # SqueezeNet / VGG / AlexNet: the last four modules with channels
            stages = []
            for layer in net.features:
                x = layer(x)
                if sum(p.numel() for p in layer.parameters()):
                    stages = [*stages[-3:], x]
            return layer_pools(stages[-1], stages[:-1])
        fmap = net.features(x)
        out = {"gap": fmap.mean(dim=(2, 3))}
        if "fc7" in pools:  # VGG / AlexNet penultimate layer, after its ReLU
            out["fc7"] = net.classifier[:-1](torch.flatten(net.avgpool(fmap), 1))
        return out

    def feature_map(self, spec: BackboneSpec, net: Any, x: Any) -> Any:
        if spec.arch.startswith("resnet"):
            for layer in (net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4):
                x = layer(x)
            return x
        return net.features(x)


def _tv(name: str, arch: str, dims: dict[str, int], default: tuple[str, ...], desc: str,
        package: str | None = None) -> BackboneSpec:
    return BackboneSpec(name, "torchvision", arch, tuple(dims), default, dims, desc, package_weights=package)


register_family(TorchvisionFamily())
for _spec in (
    _tv("resnet18", "resnet18", {"gap": 512, "penult": 256, "multi": 64 + 128 + 256 + 512}, ("gap",),
        "ResNet-18 (torchvision, ImageNet)"),
    _tv("resnet50", "resnet50", {"gap": 2048, "penult": 1024, "multi": 256 + 512 + 1024 + 2048}, ("gap",),
        "ResNet-50 (torchvision, ImageNet V1)"),
    _tv("resnet152", "resnet152", {"gap": 2048, "penult": 1024, "multi": 256 + 512 + 1024 + 2048}, ("gap",),
        "ResNet-152 (torchvision, ImageNet)"),
    _tv("vgg16", "vgg16", {"gap": 512, "fc7": 4096}, ("fc7",), "VGG-16 (torchvision, ImageNet)"),
    _tv("vgg19", "vgg19", {"gap": 512, "fc7": 4096}, ("fc7",), "VGG-19 (torchvision, ImageNet)"),
    _tv("alexnet", "alexnet", {"gap": 256, "fc7": 4096}, ("fc7",), "AlexNet (torchvision, ImageNet)"),
    _tv("squeezenet1_1", "squeezenet1_1", {"gap": 512, "penult": 512, "multi": 384 + 384 + 512 + 512},
        ("gap",), "SqueezeNet 1.1 (ImageNet)", package="squeezenet_ndf"),
):
    register_backbone(_spec)

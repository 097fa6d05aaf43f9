"""The named protocols of ``metassl bench accuracy``: the ``metassl train`` overrides each adds,
what it means, and the published numbers shown beside a GPU table (never measured here)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PROTOCOLS", "Cell", "Protocol", "extra_name"]

_PAIRING = ("Pairing: the runs of one seed share the data order and the augmented views (data.augment_on=device "
            "draws both from the seed, epoch and batch index, independently of the model), so base and base + "
            "regularizer differ only in the regularizer.")
_GPU_ANCHORS = (
    {"method": "simclr", "regularizer": "metamask", "dataset": "cifar10", "metric": "kNN top-1, k=5 t=1.0", "value": 86.01,
     "selection": "best epoch over 800 (test-selected)", "source": "official MetaMask code (jiangmengli/MetaMask) README",
     "note": "published, not measured here"},
    {"method": "barlow_twins", "regularizer": "none", "dataset": "cifar10", "metric": "kNN top-1, k=200 t=0.1", "value": 84.7,
     "selection": "as reported there", "source": "IgorSusmelj/barlowtwins README (the base of MetaMask's code)",
     "note": "published, not measured here"},
)


@dataclass(frozen=True)
class Protocol:
    """A named accuracy protocol: the ``metassl train`` overrides it adds and what it means."""

    name: str
    description: str
    overrides: tuple[str, ...]
    data_choices: tuple[str, ...]
    epochs: int
    train_subset: int | None = None
    needs_root: bool = True
    augment_on: str = "device"
    device: str = "cpu"
    knn: tuple[int, float] = (200, 0.1)
    knn_extra: tuple[tuple[int, float], ...] = ((20, 0.1),)
    anchors: tuple[dict, ...] = field(default_factory=tuple)

    def train_overrides(self, data: str, root: str | None) -> list[str]:
        """Protocol overrides + data + kNN/probe settings (+ determinism for loader augmentation)."""
        extra = "[" + ",".join(f"[{k},{t}]" for k, t in self.knn_extra) + "]"
        args = [*self.overrides, f"data={data}", *([f"data.root={root}"] if root else []),
                f"data.augment_on={self.augment_on}", f"eval.knn.k={self.knn[0]}", f"eval.knn.t={self.knn[1]}",
                f"eval.knn_extra={extra}", "eval.linear_probe=true"]
        return args + (["trainer.deterministic=true"] if self.augment_on == "loader" else [])


_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10"}


def _gpu(dataset: str, choices: tuple[str, ...]) -> Protocol:
    return Protocol(
        name=f"gpu_{dataset}", data_choices=choices, epochs=800, device="cuda", knn_extra=((20, 0.1), (5, 1.0)),
        anchors=_GPU_ANCHORS if dataset == "cifar10" else (),
        overrides=("backbone=resnet18", "batch_size=512", "trainer.precision=auto", "trainer.accelerator=gpu"),
        description=(f"{_PRETTY[dataset]} on one GPU: ResNet-18 (CIFAR stem below 64 px), batch 512, precision auto "
                     "(bf16-mixed on GPUs with native bf16, else 16-mixed), views made on the GPU, the library's "
                     "per-method optimizer defaults; kNN k=200 t=0.1 each epoch, plus k=20 t=0.1 and k=5 t=1.0 (the "
                     "setting of MetaMask's official README) at the end, and the linear probe on frozen features. "
                     "Epochs from --epochs (800 for the published anchors). " + _PAIRING))


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol(name="cpu_cifar", overrides=("protocol=cpu_cifar",), data_choices=("cifar10", "imagefolder"), epochs=8,
             description=("CIFAR-10 on CPU (src/metassl/configs/protocol/cpu_cifar.yaml): the 4-block ConvNet with "
                          "widths 64-128-256-512, batch 256, bf16 autocast + channels-last where the CPU has bf16 units, "
                          "views made for the whole batch on the CPU; kNN k=200 t=0.1 each epoch and k=20 t=0.1 at the "
                          "end, linear probe on frozen features; a method's values for this protocol come from "
                          "src/metassl/configs/protocol_method/cpu_cifar_<method>.yaml (SimCLR: temperature 0.2, "
                          "crops at scale 0.2-1, chosen on the validation split). " + _PAIRING)),
    Protocol(name="cpu_cifar_paired",
             overrides=("protocol=cpu_cifar", "backbone.widths=[32,64,128,256]", "trainer.precision=32-true"),
             data_choices=("cifar10", "imagefolder"), epochs=8, train_subset=20000,
             description=("The paired table's budget on CPU: cpu_cifar (same schedule, batch, views, kNN and probe, the "
                          "same per-method presets) with the ConvNet at half width (32-64-128-256), fp32 on every CPU "
                          "(the table is filled over several sittings, on whatever machine is at hand, and a paired "
                          "difference must not compare a bf16 run with an fp32 one), and 20,000 train "
                          "images spread over the folder (validation is eval.val_fraction of them; the test split is "
                          "whole). About 4x cheaper per image than cpu_cifar and 2.5x fewer images, so SimCLR and "
                          "Barlow Twins, each alone and + MetaMask (a meta step at its honest, about 3x cost), 3 seeds, "
                          "fit about 4-5 hours on 2 AVX2 cores (--jobs 2); the SimCLR values were chosen at this width. "
                          + _PAIRING)),
    _gpu("cifar10", ("cifar10", "imagefolder")), _gpu("cifar100", ("cifar100", "imagefolder")), _gpu("stl10", ("stl10",)),
    Protocol(name="smoke", needs_root=False, data_choices=("builtin",), epochs=2, train_subset=128,
             overrides=("protocol=smoke", "trainer.max_steps=-1", "data.num_train=400", "data.num_test=200"),
             description=("Seconds-long runs on the built-in shapes (protocol=smoke, 400/200 images, 128 for training): "
                          "checks the harness, says nothing about accuracy. " + _PAIRING)),
)}


def extra_name(k: int, t: float) -> str:
    """Key of one extra kNN pair in a cell record, e.g. ``k20_t0.1``."""
    return f"k{k}_t{t:g}"


@dataclass(frozen=True)
class Cell:
    method: str
    regularizer: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}-{self.regularizer}-s{self.seed}"

"""The demo's model and its training: a multi-task MLP, pre-training, heads, fine-tuning, evaluation.

Backbone: an MLP 64 -> 512 -> 512 -> 256 (GELU after every layer; 427k parameters, all
merged), pre-trained as a denoising autoencoder (Gaussian noise 0.2, a linear decoder that is
then discarded) on the unlabelled pre-training images in every task's view. Heads: frozen
few-shot prototype heads built from the base backbone's features (``W_c = 5 * normalize(mu_c -
mu)``, ``b_c = -W_c . mu``). Fine-tuning: the whole backbone, head frozen, cross-entropy, SGD
with momentum (see :class:`~mtmerge.demo.data.Settings` for the numbers).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from mtmerge.demo.data import TASKS, Data, Settings


class MultiTaskMLP(nn.Module):
    """A shared MLP backbone and one linear head per task.

    State dict keys: ``backbone.{0,2,4}.{weight,bias}`` and ``heads.<task>.{weight,bias}``.

    Parameters
    ----------
    tasks : sequence of str
        Keys of :data:`~mtmerge.demo.data.TASKS`: one head each.
    hidden : sequence of int
        Hidden layer widths.
    features : int
        Width of the backbone's output (the heads' input).
    """

    def __init__(self, tasks: Sequence[str], hidden: Sequence[int] = (512, 512), features: int = 256) -> None:
        super().__init__()
        sizes = [64, *hidden, features]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
        self.backbone = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t: nn.Linear(features, TASKS[t].num_classes) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Logits of ``task`` for inputs ``x`` ``[n, 64]``."""
        return self.heads[task](self.backbone(x))


def build_model(settings: Settings) -> MultiTaskMLP:
    """An untrained model for ``settings`` (initialized from the global torch RNG)."""
    return MultiTaskMLP(settings.tasks, settings.hidden, settings.features)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached, contiguous copy of ``model``'s state dict."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _run_epochs(params: list[Tensor], loss_fn: Callable[[Tensor], Tensor], n: int, epochs: int, batch: int,
                optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    for p in params:
        p.requires_grad_(True)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(order[start:start + batch]).backward()
            optimizer.step()


def pretrain(model: MultiTaskMLP, data: Data, settings: Settings) -> None:
    """Denoising-autoencoder pre-training of ``model.backbone`` on every task's view (no labels)."""
    views = sorted({TASKS[t].view for t in settings.tasks})
    x = torch.cat([data.view(v, "pretrain") for v in views])
    gen = torch.Generator().manual_seed(settings.seed * 1000 + 1)
    decoder = nn.Linear(settings.features, 64)
    params = [*model.backbone.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=settings.pretrain_lr)

    def loss_fn(batch: Tensor) -> Tensor:
        clean = x[batch]
        noisy = clean + settings.pretrain_noise * torch.randn(clean.shape, generator=gen)
        return F.mse_loss(decoder(model.backbone(noisy)), clean)

    _run_epochs(params, loss_fn, len(x), settings.pretrain_epochs, settings.pretrain_batch, opt, gen)


@torch.no_grad()
def build_heads(model: MultiTaskMLP, data: Data, settings: Settings) -> None:
    """Few-shot prototype heads on the (pre-trained) backbone's features, frozen afterwards."""
    for task in settings.tasks:
        x, y = data.task(task, "train")
        head = model.heads[task]
        shots = torch.cat([torch.nonzero(y == c)[: settings.shots, 0] for c in range(head.out_features)])
        feats, labels = model.backbone(x[shots]), y[shots]
        center = feats.mean(0)
        means = torch.stack([feats[labels == c].mean(0) for c in range(head.out_features)])
        weight = F.normalize(means - center, dim=1) * settings.head_scale
        head.weight.copy_(weight)
        head.bias.copy_(-(weight @ center))
    for p in model.heads.parameters():
        p.requires_grad_(False)


def finetune(model: MultiTaskMLP, task: str, data: Data, settings: Settings) -> None:
    """Fine-tune the whole backbone on ``task`` with its head frozen."""
    x, y = data.task(task, "train")
    gen = torch.Generator().manual_seed(settings.seed * 1000 + 2 + settings.tasks.index(task))
    params = list(model.backbone.parameters())
    opt = torch.optim.SGD(params, lr=settings.finetune_lr, momentum=settings.finetune_momentum)
    _run_epochs(params, lambda b: F.cross_entropy(model(x[b], task), y[b]), len(x), settings.finetune_epochs,
                settings.finetune_batch, opt, gen)


@torch.no_grad()
def evaluate(model: MultiTaskMLP, state: dict[str, Tensor], data: Data, tasks: Sequence[str],
             split: str = "test") -> dict[str, float]:
    """Accuracy of the weights ``state`` on each task (with the task's head from ``state``).

    Parameters
    ----------
    model : MultiTaskMLP
        Any model of the right architecture; ``state`` is loaded into it.
    state : dict of str to Tensor
        A full state dict (backbone and every head).
    data : Data
    tasks : sequence of str
    split : str
        ``"test"`` (default) or ``"val"``.

    Returns
    -------
    dict of str to float
        Task -> accuracy in [0, 1].
    """
    model.load_state_dict(state, strict=True)
    accs = {}
    for task in tasks:
        x, y = data.task(task, split)
        accs[task] = float((model(x, task).argmax(1) == y).double().mean())
    return accs

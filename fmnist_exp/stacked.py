"""K jobs of one architecture trained as one stacked model: every parameter gets a leading job dimension K.

Linear is one batched matrix product (BatchedLinear, a lone layer's products batched; the first layer on a batch
all jobs share is one wide (B, 784) @ (784, K*H) product), Conv2d one grouped convolution over K*C channels (as HFTA
does), BatchNorm one F.batch_norm over K*C channels, so each job's running stats stay exact (vmap cannot update them
in place). On a CPU each job's numbers are its own alone, to the bit (BatchedLinear, is_exact).
Jobs with and without BatchNorm stack together (a GPU replays one step for both: the step's cost there is its
launches, not its arithmetic): the others' activations pass through unchanged (torch.where, exact both ways).
Batched layers, not torch.func.vmap: a whole Adam step of the notebook MLP at K=8 costs 713 vs 1005 us per job at
batch 100, 231 vs 396 at batch 16 (1 thread, CPU time; benchmarks/stacked_step.py).
The optimizer runs torch's fused SGD / Adam / AdamW kernel once per job on that job's slices, lr and step count
read from device tensors: 58 us per job vs 140 for the same Adam as ~7 broadcast (K, 1) ops over all jobs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# Activation layouts between layers: the input every job shares (B, ...); jobs in the channel dimension
# (B, K*C, ...), as grouped conv and batch_norm want it; jobs in front (K, B, ...), as baddbmm wants it.
SHARED, WIDE, JOBS = "shared", "wide", "jobs"
KINDS = {nn.Linear: "linear", nn.Conv2d: "conv", nn.BatchNorm1d: "bn", nn.BatchNorm2d: "bn", nn.ReLU: "relu",
         nn.MaxPool2d: "pool", nn.Flatten: "flatten"}


class BatchedLinear(torch.autograd.Function):
    """K linear layers, x (K, B, in) -> (K, B, out), whose three products (output, input and weight gradients) are
    a lone F.linear's in its own orientation: x Wᵀ, g W, gᵀ x, so on a CPU each job gets the lone layer's numbers
    to the bit at every batch size and width. Autograd through `baddbmm(b, W, xᵀ)` computed the output and input
    gradient transposed (W xᵀ, Wᵀ gᵀ), which rounds differently at odd batches under 15 and layers narrower than
    16 (1e-7 after a step; a user's differential test of every config group). About as fast: a whole step -8 to
    +4 % by shape (benchmarks/RESULTS.md). The weight's gradient comes out in its own layout (K, out, in)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # each job's (B, in) row-major, as a lone layer gets it: BLAS picks kernels by layout
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        return grad_x, torch.bmm(grad.transpose(1, 2), x), grad.sum(1)


_EXACT: dict[tuple, bool] = {}  # is_exact's answers, by shapes


def is_exact(kind: str, args: dict, weight: torch.Tensor, x: torch.Tensor, grouped: bool = False) -> bool:
    """Whether one op over all K jobs' weights gives each job the numbers its own op gives it, on this CPU's
    kernels at these shapes (and the gradients too, when autograd is on): a wide op on a batch all jobs share,
    (B, in) @ (in, K*H) or a conv to K*C channels, or (`grouped`) a grouped conv of the jobs' channels (B, K*C, ...).
    BLAS and oneDNN tile the K*H columns and pick conv algorithms their own way: here wide products of widths that
    are multiples of 32 came out exact at K = 2-8 and batches 7-100, and widths 8, 16, 50 or 100 did not (1e-6 in an
    output); grouped convs of 16 channels were exact, of 8 not. Kernels are chosen by shape, not values, so one
    check on random data per shape settles it; where it is not exact the layer runs job by job."""
    grad = torch.is_grad_enabled()
    key = (kind, str(args), tuple(weight.shape), tuple(x.shape), grad, grouped)
    if key not in _EXACT:
        gen = torch.Generator().manual_seed(0)
        k, c = weight.shape[0], weight.shape[2] if grouped else 0
        xs = torch.rand(x.shape, generator=gen).requires_grad_(grad and grouped)
        w = (torch.rand(weight.shape, generator=gen) - 0.5).requires_grad_(grad)
        b = (torch.rand(weight.shape[:2], generator=gen) - 0.5).requires_grad_(grad)
        op = F.linear if kind == "linear" else lambda *a, **g: F.conv2d(*a, **args, **g)
        together = op(xs, w.flatten(0, 1), b.flatten(), **({"groups": k} if grouped else {}))
        apart = torch.cat([op(xs[:, j * c:(j + 1) * c] if grouped else xs, w[j], b[j]) for j in range(k)], dim=1)
        exact = torch.equal(together, apart)
        if exact and grad:
            g = torch.rand(together.shape, generator=gen)
            wrt = (xs, w, b) if grouped else (w, b)
            exact = all(map(torch.equal, torch.autograd.grad(together, wrt, g), torch.autograd.grad(apart, wrt, g)))
        _EXACT[key] = exact
    return _EXACT[key]


def _layer(m: nn.Module) -> tuple[str, dict]:
    """A layer's kind and the settings jobs must share (they also parametrise the stacked op)."""
    kind = KINDS.get(type(m))
    if kind == "linear" and m.bias is not None:
        return kind, dict(shape=(m.in_features, m.out_features))
    if kind == "conv" and m.bias is not None and m.groups == 1 and m.padding_mode == "zeros":
        return kind, dict(shape=(m.in_channels, m.out_channels, m.kernel_size), stride=m.stride,
                          padding=m.padding, dilation=m.dilation)
    if kind == "bn" and m.affine and m.track_running_stats and m.momentum is not None:
        return kind, dict(shape=(type(m).__name__, m.num_features), momentum=m.momentum, eps=m.eps)
    if kind == "pool" and not m.return_indices:
        return kind, dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                          ceil_mode=m.ceil_mode)
    if kind == "flatten" and (m.start_dim, m.end_dim) == (1, -1) or kind == "relu":
        return kind, {}
    raise ValueError(f"cannot stack layer {m!r}")


def _same(i: int, layers: list, j: int, reference: list) -> None:
    """Raise if job i's layers differ from job j's, naming the first layer that does."""
    if layers == reference:
        return
    n = next((n for n, (a, b) in enumerate(zip(layers, reference)) if a != b), min(len(layers), len(reference)))
    mine, theirs = (" ".join([*x[n][:2], *(f"{a}={v}" for a, v in x[n][2].items())]) if n < len(x) else "nothing"
                    for x in (layers, reference))
    raise ValueError(f"job {i} differs from job {j} at layer {n}: {mine} vs {theirs}")


def job_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each job's mean cross-entropy, shape (K,), for labels (B,) shared or (K, B) per job; backward through
    their sum gives every job exactly the gradient it gets alone."""
    k, b = logits.shape[:2]
    y = y.expand(k, b) if y.dim() == 1 else y
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(k, b).mean(1)


class StackedModel(nn.Module):
    """K `models.MLP` / `models.CNN` with the same layer sizes as one module: (B | K,B, 1, 28, 28) -> (K, B, 10)."""

    def __init__(self, plan: list[tuple[str, str, dict]], layers: nn.ModuleDict, dropout: dict[str, list[float]],
                 normalised: dict[str, list[bool]] | None = None):
        super().__init__()
        self.plan, self.layers, self.dropout = plan, layers, dropout  # use from_models / select
        self.num_jobs = next(layers.parameters()).shape[0]
        # BatchNorm layers only some jobs have: which jobs normalise there (the others keep their input); a mask
        # on the device per layer, built once (a CUDA graph reads it), one entry per channel (K*C,)
        self.normalised = {name: list(jobs) for name, jobs in (normalised or {}).items() if not all(jobs)}
        for name, jobs in self.normalised.items():
            mask = torch.tensor(jobs, device=layers[name].weight.device)
            self.register_buffer(f"_channels_{name}", mask.repeat_interleave(layers[name].weight.shape[1]),
                                 persistent=False)

    @classmethod
    def from_models(cls, models: list[nn.Sequential]) -> StackedModel:
        """Stack the models' layers, copying each model's weights and BatchNorm stats exactly. Jobs with and without
        BatchNorm stack together: a job without it gets stand-in BatchNorm parameters it never uses."""
        if not models:
            raise ValueError("no models to stack")
        skeletons, drops = [], []
        for i, model in enumerate(models):
            if type(model) is not type(models[0]):
                raise ValueError(f"job {i} is a {type(model).__name__}, job 0 a {type(models[0]).__name__}")
            layers, dropout = [], {}
            for name, m in model.named_children():
                if isinstance(m, nn.Dropout):  # keyed by the layer before it: jobs without dropout there get p = 0
                    after = layers[-1][0] if layers else None
                    if after in dropout:
                        raise ValueError(f"job {i}: two dropout layers in a row at {name}")
                    dropout[after] = (name, m.p)
                else:
                    layers.append((name, *_layer(m)))
            skeletons.append(layers)
            drops.append(dropout)
        bare = [[layer for layer in s if layer[1] != "bn"] for s in skeletons]
        with_bn = [i for i, s in enumerate(skeletons) if len(s) > len(bare[i])]
        full = skeletons[with_bn[0]] if with_bn else skeletons[0]  # every layer, BatchNorm included
        for i in range(len(models)):
            _same(i, bare[i], 0, bare[0])
            if i in with_bn:
                _same(i, skeletons[i], with_bn[0], full)
        plan, layers, dropout, normalised = [], nn.ModuleDict(), {}, {}
        children = [dict(m.named_children()) for m in models]

        def add_dropout(after: str | None) -> None:
            if any(after in d for d in drops):
                name = next(d[after][0] for d in drops if after in d)
                dropout[name] = [d[after][1] if after in d else 0.0 for d in drops]
                plan.append((name, "dropout", {}))

        add_dropout(None)
        for name, kind, args in full:
            plan.append((name, kind, {k: v for k, v in args.items() if k != "shape"}))
            if kind in ("linear", "conv", "bn"):
                mods = [c.get(name) for c in children]
                if kind == "bn":
                    normalised[name] = [m is not None for m in mods]
                    stand_in = copy.deepcopy(next(m for m in mods if m is not None))
                    stand_in.reset_parameters()  # weight 1, bias 0, running mean 0 and var 1: never used
                    mods = [stand_in if m is None else m for m in mods]
                holder = nn.Module()
                for n, p in mods[0].named_parameters(recurse=False):
                    holder.register_parameter(n, nn.Parameter(torch.stack([m.get_parameter(n).detach() for m in mods])))
                for n, _ in mods[0].named_buffers(recurse=False):
                    holder.register_buffer(n, torch.stack([m.get_buffer(n) for m in mods]))
                layers[name] = holder
            add_dropout(name)
        return cls(plan, layers, dropout, normalised).train(models[0].training)

    def has(self, k: int, layer: str) -> bool:
        """Whether job k's own model has this layer (not so for a BatchNorm layer of a job without BatchNorm)."""
        return layer not in self.normalised or self.normalised[layer][k]

    def param_owners(self) -> list[list[bool]]:
        """Per job, for each of parameters() in order: whether it is one of the job's own (not a stand-in)."""
        return [[self.has(k, name) for name, h in self.layers.items() for _ in h.parameters(recurse=False)]
                for k in range(self.num_jobs)]

    def forward(self, x: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Logits (K, B, 10) for a batch all jobs share (B, 1, 28, 28) or one per job (K, B, 1, 28, 28); in training
        mode job k's dropout masks come from generators[k] (None: torch's default generator)."""
        k = self.num_jobs
        if x.dim() == 5 and x.shape[0] == k:
            layout = JOBS
        elif x.dim() == 4:
            layout = SHARED
        else:
            raise ValueError(f"input of shape {tuple(x.shape)}: expected (B, 1, 28, 28) or ({k}, B, 1, 28, 28)")
        # On a CPU each job's own batch goes through the first layer job by job, in the op a lone job's first layer
        # is (F.linear / F.conv2d), so a job trained beside jobs of other seeds gets its numbers alone to the bit: one
        # batched product rounds differently at some batch sizes (1e-9 in a gradient, ~0.01 in an epoch's
        # accuracy). It costs 1.1-1.9x the batched product (benchmarks/stacked_step.py), one reason groups are
        # split by seed (fusion.SHARED_BATCH). A batch all jobs share goes through one wide op, and a later conv is one
        # grouped conv, where that is exact (is_exact), else job by job. On a GPU K launches would cost more than the
        # step: one batched op.
        cpu = x.device.type == "cpu"
        by_job = layout == JOBS and cpu
        for name, kind, args in self.plan:
            h = self.layers[name] if name in self.layers else None
            first = kind in ("linear", "conv") and (by_job or layout == SHARED)
            if first and layout == SHARED and (not cpu or is_exact(kind, args, h.weight, x)):
                w, b = h.weight.flatten(0, 1), h.bias.flatten()  # one wide op, not K copies of the input
                x, layout = F.linear(x, w, b) if kind == "linear" else F.conv2d(x, w, b, **args), WIDE
            elif first:  # job by job, out as one wide op's: (B, K*H) or (B, K*C, H, W)
                op = F.linear if kind == "linear" else lambda *job: F.conv2d(*job, **args)
                inputs = x.unbind(0) if by_job else [x] * k
                x = torch.cat([op(*job) for job in zip(inputs, h.weight.unbind(0), h.bias.unbind(0))], dim=1)
                layout, by_job = WIDE, False
            elif kind == "linear":
                x, layout = BatchedLinear.apply(self._jobs(x, layout), h.weight, h.bias), JOBS
            elif kind == "conv":
                x, w, b = self._wide(x, layout), h.weight.flatten(0, 1), h.bias.flatten()
                if not cpu or is_exact(kind, args, h.weight, x, grouped=True):
                    x = F.conv2d(x, w, b, groups=k, **args)
                else:  # job by job, each on its own channels
                    x = torch.cat([F.conv2d(*job, **args) for job in zip(x.chunk(k, dim=1), h.weight.unbind(0),
                                                                          h.bias.unbind(0))], dim=1)
                layout = WIDE
            elif kind == "bn":
                if name in self.normalised and not any(self.normalised[name]):
                    continue  # only stand-ins left here (the jobs with BatchNorm have left the stack)
                stats = h.running_mean.view(-1), h.running_var.view(-1), h.weight.flatten(), h.bias.flatten()
                mixed = name in self.normalised  # jobs without BatchNorm keep x: where(), exact, gradient too
                # (B, K*C, ...), a lone BatchNorm's layout at every K (so a job's statistics round as they do alone)
                x, layout = self._wide(x, layout), WIDE
                y = F.batch_norm(x, *stats, self.training, **args)
                x = torch.where(self.get_buffer(f"_channels_{name}").view(-1, *[1] * (x.dim() - 2)), y, x) \
                    if mixed else y
                if self.training:
                    h.num_batches_tracked.add_(1)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "pool":
                x = F.max_pool2d(self._wide(x, layout) if layout == JOBS else x, **args)
                layout = SHARED if layout == SHARED else WIDE
            elif kind == "flatten":
                x = x.flatten(1) if layout == SHARED else self._jobs(x, layout).flatten(2)
                layout = SHARED if layout == SHARED else JOBS
            elif kind == "dropout" and self.training:
                x = self._jobs(x, layout)
                x, layout = x * self._mask(self.dropout[name], x, generators), JOBS
        return self._jobs(x, layout)

    def _jobs(self, x: torch.Tensor, layout: str) -> torch.Tensor:
        if layout == SHARED:
            return x.expand(self.num_jobs, *x.shape)
        if layout == WIDE:
            return x.view(x.shape[0], self.num_jobs, -1, *x.shape[2:]).transpose(0, 1)
        return x

    def _wide(self, x: torch.Tensor, layout: str) -> torch.Tensor:
        if layout == SHARED:
            return x.unsqueeze(1).expand(-1, self.num_jobs, *x.shape[1:]).flatten(1, 2)
        return x.transpose(0, 1).flatten(1, 2) if layout == JOBS else x

    @staticmethod
    def _mask(ps: list[float], x: torch.Tensor, generators) -> torch.Tensor:
        """Inverted-dropout masks, job k's drawn from its own generator (jobs with p = 0 draw nothing)."""
        mask = torch.ones_like(x)  # in x's memory layout, so the product keeps it
        for k, p in enumerate(ps):
            if p > 0:
                mask[k].bernoulli_(1 - p, generator=None if generators is None else generators[k])
                mask[k].mul_(1 / (1 - p) if p < 1 else 0.0)
        return mask

    def job_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Job k's weights and BatchNorm stats under its own model's keys (loads strict into models.MLP / CNN)."""
        return {f"{name}.{key}": t[k].clone() for name, h in self.layers.items() if self.has(k, name)
                for key, t in h.state_dict().items()}

    def load_job_state_dict(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Overwrite job k's weights and BatchNorm stats with a state dict of its own model."""
        mine = {f"{name}.{key}": t for name, h in self.layers.items() if self.has(k, name)
                for key, t in h.state_dict(keep_vars=True).items()}
        if set(state) != set(mine):
            raise KeyError(f"state dict keys differ: missing {sorted(set(mine) - set(state))}, "
                           f"unexpected {sorted(set(state) - set(mine))}")
        with torch.no_grad():
            for key, t in mine.items():
                t[k].copy_(state[key])

    def select(self, keep: list[int]) -> StackedModel:
        """A new stacked model of only these jobs (in this order), so a stopped job stops costing compute."""
        if not keep:
            raise ValueError("select needs at least one job")
        layers = nn.ModuleDict()
        for name, h in self.layers.items():
            layers[name] = new = nn.Module()
            for n, p in h.named_parameters(recurse=False):
                new.register_parameter(n, nn.Parameter(p.detach()[keep], requires_grad=p.requires_grad))
            for n, b in h.named_buffers(recurse=False):
                new.register_buffer(n, b[keep])
        dropout = {name: [ps[i] for i in keep] for name, ps in self.dropout.items()}
        normalised = {name: [jobs[i] for i in keep] for name, jobs in self.normalised.items()}
        return StackedModel(self.plan, layers, dropout, normalised).train(self.training)


def _hyper(h: dict) -> dict:
    """One job's optimizer settings with torch's defaults filled in."""
    kind = h["kind"]
    if kind not in ("sgd", "adam", "adamw"):
        raise ValueError(f"unknown optimizer kind {kind!r}: expected sgd, adam or adamw")
    out = dict(kind=kind, lr=float(h["lr"]), weight_decay=float(h.get("weight_decay", 1e-2 if kind == "adamw" else 0)))
    if kind == "sgd":
        out.update(momentum=float(h.get("momentum", 0.0)), nesterov=bool(h.get("nesterov", False)))
        if out["nesterov"] and out["momentum"] <= 0:
            raise ValueError("nesterov needs momentum > 0")
    else:
        b1, b2 = h.get("betas", (0.9, 0.999))
        out.update(betas=(float(b1), float(b2)), eps=float(h.get("eps", 1e-8)))
    return out


class StackedOptimizer:
    """SGD (momentum, nesterov, L2 decay; dampening 0) / Adam (L2) / AdamW (decoupled) per job over stacked
    parameters (leading dim K), equal job by job to torch.optim; jobs of different kinds share one optimizer.
    `owners[k][i]`: whether params[i] is job k's own (StackedModel.param_owners); a job steps only its own, and its
    state lists them in order, as its own model's optimizer does."""

    def __init__(self, params: list[torch.Tensor], hyper: list[dict], owners: list[list[bool]] | None = None):
        self.params, self.hyper = list(params), [_hyper(h) for h in hyper]
        if any(p.shape[0] != len(self.hyper) for p in self.params):
            raise ValueError(f"{len(self.hyper)} jobs' settings for parameters of {self.params[0].shape[0]} jobs")
        self.owners = [list(o) for o in owners] if owners is not None else [[True] * len(self.params)] * len(hyper)
        self._owned = [any(own[i] for own in self.owners) for i in range(len(self.params))]  # by any job
        device = self.params[0].device
        self.lr = torch.tensor([h["lr"] for h in self.hyper], dtype=torch.float32, device=device)
        self.steps = torch.zeros(len(self.hyper), dtype=torch.float32, device=device)  # float32: what fused Adam reads
        adam = any(h["kind"] != "sgd" for h in self.hyper)
        momentum = adam or any(h.get("momentum") for h in self.hyper)
        # Zeroed momentum buffers give torch's first step (buf = grad) without a first-step branch.
        zeros = lambda: [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]
        self.exp_avg = zeros() if momentum else []  # SGD jobs keep their momentum buffer here
        self.exp_avg_sq = zeros() if adam else []
        with torch.no_grad():  # per-job views, built once: in-place updates reach the stacked tensors
            self._views = [self._per_job(ts) for ts in (self.params, self.exp_avg, self.exp_avg_sq)]
            self._lr, self._steps = self.lr.unbind(0), self.steps.unbind(0)

    def _per_job(self, tensors: list[torch.Tensor | None]) -> list[list[torch.Tensor]]:
        """Each job's slices of its own tensors, in order (a tensor no job owns may be None: no gradient)."""
        if not tensors:
            return [[] for _ in self.hyper]
        slices = [t.unbind(0) if owned else None for t, owned in zip(tensors, self._owned)]
        return [[s[k] for s, mine in zip(slices, own) if mine] for k, own in enumerate(self.owners)]

    @torch.no_grad()
    def step(self) -> None:
        """One step of every job from the parameters' .grad; no host sync (lr and steps are read on the device)."""
        self.steps.add_(1)
        grads = self._per_job([p.grad for p in self.params])
        for h, ps, ms, vs, g, lr, step in zip(self.hyper, *self._views, grads, self._lr, self._steps):
            if h["kind"] == "sgd":
                torch._fused_sgd_(ps, g, ms if h["momentum"] else [], weight_decay=h["weight_decay"],
                                  momentum=h["momentum"], lr=lr, dampening=0.0, nesterov=h["nesterov"],
                                  maximize=False, is_first_step=False)
            else:
                fused = torch._fused_adam_ if h["kind"] == "adam" else torch._fused_adamw_
                fused(ps, g, ms, vs, [], [step] * len(ps), lr=lr, beta1=h["betas"][0],
                      beta2=h["betas"][1], weight_decay=h["weight_decay"], eps=h["eps"], amsgrad=False, maximize=False)

    def zero_grad(self) -> None:
        """Drop the gradients (the next backward then writes them without an extra add)."""
        for p in self.params:
            p.grad = None

    def set_lr(self, k: int, value: float) -> None:
        """Change job k's learning rate in place (a schedule between epochs; a captured graph sees it)."""
        self.lr[k].fill_(value)
        self.hyper[k]["lr"] = float(value)

    def lr_of(self, k: int) -> float:
        """Job k's learning rate, from the host copy (no device read)."""
        return self.hyper[k]["lr"]

    def job_state(self, k: int) -> dict:
        """Job k's optimizer state as its own torch.optim optimizer's state_dict() (loads into one), cloned."""
        h, state = self.hyper[k], {}
        mine = [i for i, own in enumerate(self.owners[k]) if own]
        for j, i in enumerate(mine):  # numbered as the job's own optimizer numbers its parameters
            if h["kind"] == "sgd":
                state[j] = {"momentum_buffer": self.exp_avg[i][k].clone() if h["momentum"] else None}
            else:
                state[j] = {"step": self.steps[k].clone(), "exp_avg": self.exp_avg[i][k].clone(),
                            "exp_avg_sq": self.exp_avg_sq[i][k].clone()}
        group = {key: v for key, v in h.items() if key != "kind"} | {"params": list(range(len(mine)))}
        if h["kind"] == "sgd":
            group["dampening"] = 0.0  # torch.optim.SGD's load_state_dict does not default it
        return {"state": state, "param_groups": [group]}

    def load_job_state(self, k: int, state: dict) -> None:
        """Overwrite job k's state (and lr) with `job_state` output or its torch.optim optimizer's state_dict()."""
        with torch.no_grad():
            self.steps[k].zero_()
            for j, i in enumerate(i for i, own in enumerate(self.owners[k]) if own):
                s = state["state"].get(j, {})
                for buf, key in ((self.exp_avg, "exp_avg"), (self.exp_avg_sq, "exp_avg_sq")):
                    value = s.get(key, s.get("momentum_buffer") if key == "exp_avg" else None)
                    if buf:
                        buf[i][k].copy_(value) if value is not None else buf[i][k].zero_()
                if "step" in s:
                    self.steps[k].copy_(s["step"])
        self.set_lr(k, state["param_groups"][0]["lr"])

    def select(self, keep: list[int], new_params: list[torch.Tensor]) -> StackedOptimizer:
        """The optimizer of `StackedModel.select(keep)`: these jobs' settings and state, on `new_params`."""
        new = StackedOptimizer(new_params, [self.hyper[i] for i in keep], [self.owners[i] for i in keep])
        with torch.no_grad():
            new.lr.copy_(self.lr[keep])
            new.steps.copy_(self.steps[keep])
            for mine, theirs in ((self.exp_avg, new.exp_avg), (self.exp_avg_sq, new.exp_avg_sq)):
                for a, b in zip(mine, theirs):
                    b.copy_(a[keep])
        return new

"""The official iBOT implementation's training step (github.com/bytedance/ibot, `main_ibot.py`), at the shapes of a
mimkit benchmark case, for `step_throughput.py --method ibot --reference PATH`.

Everything that computes is the reference's own code, imported from the checkout at PATH: its `VisionTransformer`,
`iBOTHead`, `MultiCropWrapper`, `iBOTLoss`, `clip_gradients`, `cancel_gradients_last_layer`, `get_params_groups`.
This file only builds them from the case's config (the same backbone, head, crops, masks and batch as mimkit's
step) and runs, in their order, the statements of one iteration of its `train_one_epoch`: forward of teacher and
student, the loss and its `.item()` finiteness check, the teacher/student agreement it logs, backward, clipping,
AdamW, the EMA loop over the common parameters and the per-step `.item()` of the logged losses.

Modules `main_ibot.py` imports at the top but a step never calls (TensorBoard's writer, the clustering metrics of
its epoch end) are replaced by empty ones when they are not installed, so the checkout runs without its extra
dependencies. Its loss all-reduces the centers, so a one-process gloo group is started when none exists.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

NOT_CALLED_IN_A_STEP = {
    "tensorboardX": {"SummaryWriter": object},
    "evaluation.unsupervised.unsup_cls": {"eval_pred": None},
}


def _import_checkout(checkout: Path) -> types.SimpleNamespace:
    checkout = checkout.expanduser().resolve()
    if not (checkout / "main_ibot.py").is_file() or not (checkout / "models" / "head.py").is_file():
        raise SystemExit(
            f"--reference {checkout}: not a checkout of the official iBOT code (no main_ibot.py and models/head.py "
            "there); clone https://github.com/bytedance/ibot and pass its folder"
        )
    sys.path.insert(0, str(checkout))
    for name, attributes in NOT_CALLED_IN_A_STEP.items():
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__dict__.update(attributes)
            sys.modules[name] = stub
    return types.SimpleNamespace(
        main=importlib.import_module("main_ibot"),
        utils=importlib.import_module("utils"),
        head=importlib.import_module("models.head"),
        vit=importlib.import_module("models.vision_transformer"),
    )


def _one_process_group() -> None:
    if dist.is_available() and not dist.is_initialized():
        store = Path(tempfile.mkdtemp(prefix="ibot_reference_")) / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def reference_step(bench: Any, checkout: Path) -> Any:
    """A callable running one reference iteration on the bench's batch (moved to the bench's device)."""
    ref = _import_checkout(checkout)
    _one_process_group()
    cfg = bench.cfg
    method_cfg, backbone = cfg.method, cfg.method.backbone
    device = bench.fabric.device

    def network(student: bool) -> Any:
        vit = ref.vit.VisionTransformer(
            img_size=[backbone.img_size],
            patch_size=backbone.patch_size,
            in_chans=cfg.data.channels,
            embed_dim=backbone.embed_dim,
            depth=backbone.depth,
            num_heads=backbone.num_heads,
            mlp_ratio=4,
            qkv_bias=True,
            drop_path_rate=backbone.drop_path_rate if student else 0.0,
            return_all_tokens=True,
            masked_im_modeling=student,
        )
        head = ref.head.iBOTHead(
            backbone.embed_dim,
            method_cfg.out_dim,
            patch_out_dim=method_cfg.patch_out_dim,
            hidden_dim=method_cfg.head_hidden_dim,
            bottleneck_dim=method_cfg.head_bottleneck_dim,
            norm_last_layer=method_cfg.norm_last_layer if student else True,
            shared_head=method_cfg.shared_head if student else method_cfg.teacher_shares_head,
        )
        return ref.utils.MultiCropWrapper(vit, head).to(device)

    torch.manual_seed(cfg.seed)
    student, teacher = network(True), network(False)
    teacher.load_state_dict(student.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    views = bench.batch["views"]
    num_global = len(views["global"])
    images = [*views["global"], *views["local"]]
    masks = list(views["masks"])
    loss_fn = ref.main.iBOTLoss(
        method_cfg.out_dim,
        method_cfg.patch_out_dim,
        num_global,
        len(views["local"]),
        method_cfg.warmup_teacher_temp,
        method_cfg.teacher_temp,
        method_cfg.warmup_teacher_patch_temp,
        method_cfg.teacher_patch_temp,
        method_cfg.warmup_teacher_temp_epochs,
        cfg.train.epochs,
        lambda1=method_cfg.lambda_cls,
        lambda2=method_cfg.lambda_patch,
    ).to(device)
    optimizer = torch.optim.AdamW(ref.utils.get_params_groups(student))
    lr = bench.hyperparameters.lr
    momentum = method_cfg.momentum_teacher
    student_params = dict(student.named_parameters())
    pairs = [(student_params[n], p) for n, p in teacher.named_parameters() if n in student_params]
    epoch = bench.epoch

    def step() -> None:
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = lr.start
            if index == 0:
                group["weight_decay"] = cfg.optim.weight_decay
        with bench.fabric.autocast():  # the reference autocasts the same span (forwards and loss) in fp16 mode
            teacher_output = teacher(images[:num_global])
            student_output = student(images[:num_global], mask=masks)
            student.backbone.masked_im_modeling = False
            local_cls = student(images[num_global:])[0] if len(images) > num_global else None
            student.backbone.masked_im_modeling = True
            losses = loss_fn(student_output, teacher_output, local_cls, masks, epoch)
            loss = losses.pop("loss")
        if not torch.isfinite(loss).item():
            raise FloatingPointError(f"reference loss {loss.item()}")
        teacher_first = teacher_output[0].chunk(num_global)[0].argmax(1)
        student_second = student_output[0].chunk(num_global)[-1].argmax(1)
        (teacher_first == student_second).float().mean()
        optimizer.zero_grad()
        loss.backward()
        ref.utils.clip_gradients(student, method_cfg.clip_grad)
        ref.utils.cancel_gradients_last_layer(epoch, student, method_cfg.freeze_last_layer_epochs)
        optimizer.step()
        with torch.no_grad():
            for student_param, teacher_param in pairs:
                teacher_param.data.mul_(momentum).add_((1 - momentum) * student_param.detach().data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        [value.item() for value in (loss, *losses.values())]

    return step

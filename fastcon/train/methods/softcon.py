"""SoftCon: Siamese-masked online ViT + predictor against an EMA teacher, land-cover soft targets.

The online encoder sees a Siamese-masked view (only ``mask.keep`` of the patch tokens), then
projector and predictor; an EMA teacher (encoder + projector) sees the other view whole.
``fastcon.soft_contrastive_loss`` pulls the prediction of tile i toward the teacher embedding of
tile j in proportion to the cosine of their land-cover label vectors (not only j == i).
``softcon.both_directions`` also predicts view 1 from masked view 2.
"""

from __future__ import annotations

import torch
from torch import nn

from fastcon.models import EMATeacher, predictor
from fastcon.train.methods.base import Branch, Method, StepContext, ddp_objective


class SoftConStudent(nn.Module):
    """Online network: masked view(s) -> encoder -> projector -> predictor."""

    def __init__(self, online: Branch, head: nn.Module, keep, both_directions: bool):
        super().__init__()
        self.online, self.predictor = online, head
        self.keep, self.both_directions = keep, both_directions

    def forward(self, view1, view2, generator):
        # both directions in one encoder pass over the concatenated batch
        x = torch.cat([view1, view2]) if self.both_directions else view1
        return self.predictor(self.online(x, keep=self.keep, generator=generator))


class SoftCon(Method):
    name = "softcon"
    loss_terms = ("loss",)

    def __init__(self, cfg, info, online: Branch, keep):
        super().__init__(cfg, info)
        m, s = cfg.model, cfg.softcon
        self.encoder = online.encoder
        self.student = SoftConStudent(
            online, predictor(m.proj_dim, m.pred_hidden, m.pred_layers), keep, s.both_directions
        )
        self.teacher = EMATeacher(online, base_momentum=s.teacher_momentum, total_steps=cfg.train.steps)

    def losses(self, ctx: StepContext) -> dict:
        s = self.cfg.softcon
        with ctx.autocast():
            pred = self.forward(ctx.view1, ctx.view2, ctx.mask_gen)
            with torch.no_grad():
                target = self.teacher_forward(torch.cat([ctx.view2, ctx.view1]) if s.both_directions else ctx.view2)
        ctx.lap("forward")
        labels = ctx.to_device("labels") if s.use_labels else None
        kw = dict(temperature=s.temperature, symmetric=s.symmetric, loss=s.loss, hard_weight=s.hard_weight)
        if s.loss == "sigmoid":
            kw["bias"] = s.bias
        if s.both_directions:
            p1, p2 = pred.chunk(2)
            k2, k1 = target.chunk(2)
            loss_c = 0.5 * (self.contrastive(p1, k2, labels, **kw) + self.contrastive(p2, k1, labels, **kw))
        else:
            loss_c = self.contrastive(pred, target, labels, **kw)
        ctx.lap("loss")
        objective = ddp_objective(loss_c, self.info.world_size, self.cfg.train.accum_steps)
        return {"loss": loss_c, "objective": objective}

    def after_step(self, step: int, finite: bool) -> dict:
        if not finite:
            return {}
        return {"momentum": self.teacher.update(self.student.online, step=step)}

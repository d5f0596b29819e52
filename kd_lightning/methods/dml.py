r"""Online distillation: deep mutual learning.

Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning import KDConfigError
from kd_lightning.losses import deep_mutual_learning_loss
from kd_lightning.losses.labels import target_classes
from kd_lightning.methods.base import DistillationModule
from kd_lightning.methods.checks import check_temperature, check_weights
from kd_lightning.training.optim import step_manual_lr_schedulers
from kd_lightning.training.lightning_compat import ddp_finds_unused_parameters, drop_hyperparameter


class DeepMutualLearning(DistillationModule):
    r"""Deep mutual learning (Zhang et al. 2018): ``K >= 2`` peers trained together from scratch.

    Each peer :math:`k` minimises its cross-entropy with the labels plus the mean KL divergence
    from the other peers' current predictions to its own (Eq. 10,
    :func:`~kd_lightning.losses.deep_mutual_learning_loss`):
    :math:`L_{\Theta_k} = L_{C_k} + \frac{1}{K-1}\sum_{l \ne k} D_{KL}(p_l \| p_k)`, the other
    peers' predictions detached.

    **Update (Algorithm 1).** Every minibatch takes one optimizer step per peer, in order
    ``0, 1, ..., K-1``, each peer with an optimizer of its own (the injected ``optimizer`` and
    ``lr_scheduler``, one copy per peer). With ``sequential: true`` (default, the paper's
    alternating update) peer ``k`` distils from the predictions of peers ``< k`` recomputed after
    their step on this minibatch (one extra no-gradient forward per updated peer); with
    ``sequential: false`` every peer distils from the predictions all peers made at the start of
    the minibatch.

    **Peers.** Same or different architectures, as long as they share the input and the number of
    classes. Peer 0 is "the student": it is ``self.student``, its accuracy is ``val/acc`` /
    ``test/acc`` (and selects the best checkpoint), and ``predict`` uses it. A teacher trained
    from scratch together with the student is a large peer beside a small peer 0
    (``configs/mnist1d/dml_teacher_student.yaml``). Every peer and every optimizer state is in the
    checkpoint, so ``--ckpt_path last.ckpt`` resumes all of them.

    **Step counting.** Only peer 0's step counts in ``global_step`` (the others are stepped
    through the strategy, with the same precision handling), so ``global_step`` is the number of
    minibatches trained and ``max_steps``, ``log_every_n_steps`` and ``lr_scheduler_interval:
    step`` mean what they mean for every other method. Trainer-level gradient clipping is not
    available in manual optimisation.

    **DDP.** Each backward pass reaches one peer, so DDP needs
    ``--trainer.strategy ddp_find_unused_parameters_true``; gradients are averaged over processes
    and every process keeps the same peers.

    **Logged.** ``train/loss`` (sum over peers), per peer ``train/loss_ce_peer<k>``,
    ``train/loss_kl_peer<k>`` (unweighted) and ``train/acc_peer<k>``; ``train/acc`` is peer 0's.
    Validation and test: ``<split>/acc`` (peer 0), ``<split>/acc_peer<k>`` for every peer and
    ``<split>/acc_ensemble``, the accuracy of the peers' mean softmax.

    Args:
        peers: the ``K >= 2`` networks (``class_path`` entries in YAML), each mapping inputs to
            ``num_classes`` logits.
        ce_weight: weight of each peer's cross-entropy (default 1, as the paper).
        kd_weight: weight of the mean KL term (default 1, as the paper).
        temperature: softmax temperature of the KL term (default 1, as the paper; the term is
            scaled by ``T^2`` otherwise).
        sequential: the alternating update of Algorithm 1 (default) or the simultaneous one.
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule` (``optimizer``,
            ``lr_scheduler``, ...; ``student`` is peer 0 and ``teacher`` is refused).
    """

    requires_teacher = False
    optimizes_itself = True

    def __init__(self, peers: list[nn.Module], ce_weight: float = 1.0, kd_weight: float = 1.0,
                 temperature: float = 1.0, sequential: bool = True, **kwargs) -> None:
        peers = list(peers) if peers is not None else []
        if len(peers) < 2:
            raise KDConfigError(
                f"DeepMutualLearning needs at least two peers, got {len(peers)}: set "
                f"model.init_args.peers to a list of two or more networks (class_path + init_args).")
        for i, peer in enumerate(peers):
            if not isinstance(peer, nn.Module):
                raise KDConfigError(f"DeepMutualLearning: peer {i} is a {type(peer).__name__}, not an "
                                    f"nn.Module.")
        if len({id(p) for p in peers}) != len(peers):
            raise KDConfigError("DeepMutualLearning: the same network object appears twice in peers; "
                                "give each peer its own network.")
        if kwargs.get("student") is not None:
            raise KDConfigError("DeepMutualLearning: the student is peer 0; give every network in "
                                "model.init_args.peers and leave model.init_args.student unset.")
        if kwargs.get("teacher") is not None or kwargs.get("teacher_checkpoint") is not None:
            raise KDConfigError(
                "DeepMutualLearning trains every network from scratch and takes no frozen teacher: "
                "put the teacher network into model.init_args.peers (e.g. a large peer beside a "
                "small peer 0, as in configs/mnist1d/dml_teacher_student.yaml).")
        kwargs.pop("student", None)
        check_weights("DeepMutualLearning", ce_weight=ce_weight, kd_weight=kd_weight)
        check_temperature("DeepMutualLearning", temperature)
        super().__init__(student=peers[0], **kwargs)
        drop_hyperparameter(self, "peers")  # the networks are in the state_dict and the config
        self.peers = nn.ModuleList(peers)
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.temperature, self.sequential = temperature, sequential
        if self.metrics_built:
            self._build_peer_metrics(self.num_classes)

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    # ---- metrics --------------------------------------------------------------------------------
    def build_metrics(self, k: int) -> None:
        super().build_metrics(k)
        if hasattr(self, "peers"):  # else __init__ builds them once the peers exist
            self._build_peer_metrics(k)

    def _build_peer_metrics(self, k: int) -> None:
        acc = lambda: MulticlassAccuracy(num_classes=k, average="micro")  # noqa: E731
        for prefix in ("val", "test"):
            setattr(self, f"{prefix}_acc_peers", nn.ModuleList(acc() for _ in self.peers))
            setattr(self, f"{prefix}_acc_ensemble", acc())

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and ddp_finds_unused_parameters(self.trainer.strategy) is False:
            raise KDConfigError(
                "DeepMutualLearning makes one backward pass per peer, each reaching only that "
                "peer's parameters, so DDP must look for unused parameters: use --trainer.strategy "
                "ddp_find_unused_parameters_true (or ddp_spawn_find_unused_parameters_true).")
        shape = getattr(getattr(self.trainer, "datamodule", None), "input_shape", None)
        if shape is not None:
            with torch.no_grad():
                was_training = self.training
                self.eval()
                outputs = [p(torch.zeros(2, *shape, device=self.device)) for p in self.peers]
                self.train(was_training)
            for i, out in enumerate(outputs):
                if out.ndim != 2 or out.shape[1] != self.num_classes:
                    raise KDConfigError(
                        f"DeepMutualLearning: peer {i} ({type(self.peers[i]).__name__}) outputs shape "
                        f"{tuple(out.shape)} for input {tuple(shape)}; every peer must output "
                        f"[batch, {self.num_classes}] logits (set its num_classes).")

    # ---- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizers = [self.build_optimizer([p for p in peer.parameters() if p.requires_grad])
                      for peer in self.peers]
        configs = [self.lr_scheduler_config(opt) for opt in optimizers]
        if configs[0] is None:
            return optimizers
        return optimizers, configs

    def minibatch_step(self, batch, batch_idx: int):
        x, y, _ = batch
        optimizers = self.optimizers()
        logits = [peer(x) for peer in self.peers]
        targets = [z.detach() for z in logits]  # the peers' current predictions, as constants
        total = 0.0
        logged: dict[str, Tensor] = {}
        for k, optimizer in enumerate(optimizers):
            others = [targets[j] for j in range(self.num_peers) if j != k]
            loss, ce, kl = deep_mutual_learning_loss(logits[k], others, y, self.temperature,
                                                     self.ce_weight, self.kd_weight)
            self.optimizer_step_manually(optimizer, loss, counted=k == 0)
            if self.sequential and k + 1 < self.num_peers:
                with torch.no_grad():  # Algorithm 1: the next peers see peer k after its update
                    targets[k] = self.peers[k](x).detach()
            total = total + loss.detach()
            acc = (logits[k].detach().argmax(-1) == target_classes(y)).float().mean()
            logged.update({f"loss_ce_peer{k}": ce.detach(), f"loss_kl_peer{k}": kl.detach(),
                           f"acc_peer{k}": acc})
        step_manual_lr_schedulers(self, "step", batch_idx + 1)
        self.log_terms(logits[0].detach(), y, loss=total, **logged)
        return total

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        step_manual_lr_schedulers(self, "epoch", self.current_epoch + 1)  # every peer's

    # ---- evaluation: every peer and their ensemble -----------------------------------------------
    def _eval_peers(self, batch, prefix: str) -> None:
        x, y, _ = batch
        logits = self.eval_step(batch, prefix)  # peer 0: <prefix>/loss, <prefix>/acc (+ top-5)
        probs = 0.0
        for k, (peer, metric) in enumerate(zip(self.peers, getattr(self, f"{prefix}_acc_peers"))):
            logits = logits if k == 0 else peer(x)
            metric.update(logits, y)
            probs = probs + logits.float().softmax(-1)
        getattr(self, f"{prefix}_acc_ensemble").update(probs / self.num_peers, y)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_peers(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_peers(batch, "test")

    def _log_peer_metrics(self, prefix: str) -> None:
        metrics = {f"{prefix}/acc_peer{k}": m.compute()
                   for k, m in enumerate(getattr(self, f"{prefix}_acc_peers"))}
        metrics[f"{prefix}/acc_ensemble"] = getattr(self, f"{prefix}_acc_ensemble").compute()
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        for m in getattr(self, f"{prefix}_acc_peers"):
            m.reset()
        getattr(self, f"{prefix}_acc_ensemble").reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_peer_metrics("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_peer_metrics("test")


r"""Mutual distillation: knowledge (rules) as the teacher, with learned rules and rule weights.

Hu et al., "Harnessing Deep Neural Networks with Logic Rules", ACL 2016, and "Deep Neural Networks
with Massive Learned Knowledge", EMNLP 2016.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning import KDConfigError
from kd_lightning.losses import (
    imitation_weight,
    knowledge_loss,
    labelled_mean,
    mutual_student_loss,
    response_kd_loss,
    rule_regularized_teacher,
    rule_weight_loss,
)
from kd_lightning.losses.labels import mixed, target_classes
from kd_lightning.losses.mutual import LAMBDA_OBJECTIVES
from kd_lightning.methods.base import DistillationModule
from kd_lightning.methods.checks import check_temperature, check_weights
from kd_lightning.models.teacher import PerExampleCache
from kd_lightning.rules.base import Rule, evaluate_rules, rule_label
from kd_lightning.training.epochs import minibatches_per_epoch
from kd_lightning.training.optim import step_manual_lr_schedulers
from kd_lightning.training.lightning_compat import ddp_finds_unused_parameters, drop_hyperparameter


class MutualDistillation(DistillationModule):
    r"""Rule knowledge as the teacher (Hu et al. 2016), with learnable rules and weights.

    Two teachers appear here: the *rule teacher* ``q`` (the student projected onto the rules) and,
    optionally, a frozen *network teacher* (``teacher``) as in the other methods. Each training
    batch runs Algorithm 1 of Hu et al. (2016), with three optimisers stepped in its order:

    1. **Build the teacher** (line 5, "with Eq. (2) and Eq. (6)"): first the rule weights
       ``lambda >= 0`` take one step up the mean probability of the true labels under
       :math:`q_\lambda` (Eq. 6, :func:`~kd_lightning.losses.rule_weight_loss`; or up their mean
       log-likelihood with ``lambda_objective: mean_log_q``), then the rule teacher is built with
       the updated weights (Eq. 2,
       :func:`~kd_lightning.losses.rule_regularized_teacher`):
       :math:`\log q = \log p_\theta + C \sum_l \lambda_l (r_l - 1) - \log Z`.
    2. **Update the student** (line 6, Eq. 3):
       :math:`(1 - \pi)\,CE(y, p_\theta) + \pi\,\mathrm{softCE}(q, p_\theta)` with
       :math:`\pi_t = \min(\pi_0, 1 - \alpha^t)` (:math:`\alpha` = ``pi_rate``), ``t`` in epochs
       (fractional within an epoch).
    3. **Update the knowledge** (line 7, Eq. 5): the rules' parameters ``phi`` maximise
       :math:`(1 - \pi')\,h_\phi(x, y) + \pi'\,E_q[h_\phi(x, y)]`
       (:func:`~kd_lightning.losses.knowledge_loss`), ``q`` a constant.

    ``q`` is always detached where it is a target; ``p`` and ``r`` are constants in the
    ``lambda`` step. ``lambda`` is a plain parameter projected onto ``lambda >= 0`` (clamped)
    after each of its steps, so a useless or harmful rule can be switched off exactly
    (``lambda = 0``); ``softplus`` would only approach 0.

    **Optimisers.** ``theta`` (the student) uses the injected ``optimizer`` (and
    ``lr_scheduler``, stepped by this class per epoch or per step as ``lr_scheduler_interval``
    says); ``phi`` and ``lambda`` use Adam with ``phi_lr`` / ``lambda_lr``. An optimiser with
    nothing to learn is left out: ``self.optimizers()`` is ``[theta, phi, lambda]`` with learnable
    rules, ``[theta, lambda]`` with fixed rules (or ``learn_phi=False``), and ``lambda`` is absent
    with ``learn_lambda=False``. All of them (and ``lambda``, ``phi``) are saved in checkpoints and
    restored on resume.

    **Step counting.** In manual optimisation Lightning's ``global_step`` counts every
    ``LightningOptimizer.step()``; here only the student's step is counted (``phi`` and ``lambda``
    are stepped through the strategy, with the same precision handling, but not counted), so
    ``global_step`` = number of batches trained, and ``max_steps``, ``log_every_n_steps``,
    ``val_check_interval`` and ``lr_scheduler_interval: step`` mean what they mean for every other
    method. Trainer-level gradient clipping is not available in manual optimisation.

    **DDP.** Each backward pass reaches only some parameters, so DDP needs
    ``--trainer.strategy ddp_find_unused_parameters_true``; gradients of all three updates are
    then averaged over processes and every process keeps the same ``theta``, ``phi`` and
    ``lambda`` (plain ``ddp`` is refused with a message saying so).

    **Caching.** When no rule has trainable parameters (fixed rules, or ``learn_phi=False``) and
    the training inputs are deterministic, the rules are evaluated once per training example at
    the start of training and read from that cache (``rule_cache``; a rule without parameters is
    assumed to be a deterministic function of ``x`` -- set ``rule_cache: false`` if it is not).
    With learnable rules, the part of each rule that depends on ``x`` alone
    (:meth:`~kd_lightning.rules.Rule.example_features`, e.g. the window norms of the MNIST-1D
    template rule) is cached per training example instead, under the same conditions; the
    values are the same as without the cache.

    **Network teacher (optional).** Hu et al. call ``q`` a joint teacher; a frozen network
    ``teacher`` (``teacher``/``teacher_checkpoint`` of the base class) can join it as in
    :class:`~kd_lightning.methods.ResponseKD`: the label term becomes
    :math:`(1-\pi)[w_{ce}\,CE(y, p) + w_{kd} T^2 KL(\sigma(z_t/T) \| \sigma(z_s/T))]`.

    **Unlabelled transfer examples** (``data.unlabelled``, ``y = -1``): ``q`` is built from the
    student and the rules, without the label, so it exists on every example. Per term:

    * ``lambda`` (Eq. 6): the likelihood of the *labels* under ``q_lambda`` -- labelled rows only
      (0 on a batch without one, and then ``lambda`` does not move);
    * student (Eq. 3): ``(1 - pi) CE(y, p)`` over the labelled rows, ``pi softCE(q, p)`` over
      every row (and, with a network teacher, its soft term over every row);
    * knowledge ``phi`` (Eq. 5): ``(1 - pi') h_phi(x, y)`` over the labelled rows,
      ``pi' E_q[h_phi(x, .)]`` over every row;
    * the rules' ``fit_to_labelled`` sees the labelled examples only; ``train/acc`` and
      ``train/acc_q`` count the labelled rows.

    **Logged.** ``train/loss`` (student objective), ``train/loss_ce``, ``train/loss_q``
    (softCE(q, p)), ``train/loss_kd`` (network teacher), ``train/loss_lambda`` (Eq. 6: minus the mean ``q(y)``, or
    the NLL with ``mean_log_q``),
    ``train/loss_phi`` (Eq. 5, negated), ``train/acc`` and ``train/acc_q``; once per logging
    epoch ``train/lambda_<l>`` for each rule (in the order of ``rules``), ``train/pi`` and
    ``train/pi_prime``. Validation/test: ``val/acc`` / ``test/acc`` (student ``p``),
    ``val/acc_q`` / ``test/acc_q`` (teacher ``q``, which needs the rules at test time) and
    ``val/acc_rule`` / ``test/acc_rule`` (the rules alone: ``argmax_y sum_l lambda_l r_l(x, y)``,
    or equal weights while every ``lambda`` is 0; an example no rule applies to counts as class 0).

    Args:
        rules: the knowledge, a list of :class:`~kd_lightning.rules.Rule` modules (``class_path``
            entries in YAML). Each returns ``r`` of shape ``[batch, num_classes]`` in [0, 1].
        C: regularisation strength ``C >= 0`` of the projection (default 6). ``C = 0`` gives
            ``q = p``.
        lambdas: initial rule weights ``lambda_l >= 0``: one number for every rule, or a list with
            one entry per rule (default 1).
        learn_lambda: learn ``lambda`` with Eq. 6 (default true); false keeps the hand-set
            weights (ACL 2016 setting).
        lambda_objective: what ``lambda`` maximises (:func:`~kd_lightning.losses.rule_weight_loss`):
            ``"mean_q"`` (default, Eq. 6 as Hu et al. write it: the mean of ``q_lambda(y_n)``) or
            ``"mean_log_q"`` (the mean log-likelihood ``log q_lambda(y_n)``: the maximum-likelihood
            fit, which a few examples the rules contradict hold down; the same maximiser per
            example, not for the average).
        lambda_lr: Adam learning rate of ``lambda`` (default 0.01).
        learn_phi: learn the rules' parameters with Eq. 5 (default true); false freezes them
            (fixed knowledge, ACL 2016 setting).
        phi_lr: Adam learning rate of ``phi`` (default 0.001).
        pi_0: upper bound of the imitation weight ``pi``, in [0, 1] (default 0.9).
        pi_rate: ``alpha`` of ``pi_t = min(pi_0, 1 - alpha^t)``, in [0, 1] (default 0.95 per
            epoch; 0 jumps to ``pi_0`` at once, 1 keeps ``pi = 0``).
        pi_prime: ``pi'`` of Eq. 5, the weight of the teacher against the true labels in the
            knowledge update, in [0, 1] (default 0.5).
        phi_objective: ``h`` of Eq. 5: ``"r"`` (default: the paper's ``f = r - 1`` up to a
            constant) or ``"log_r"`` (a log-likelihood variant); see
            :func:`~kd_lightning.losses.knowledge_loss`.
        ce_weight: with a network teacher, the weight of the cross-entropy in the label part
            (default 0.1, as in ResponseKD; without one the label part is the cross-entropy).
        kd_weight: with a network teacher, the weight of its soft-target term (default 0.9).
        temperature: with a network teacher, its softmax temperature ``T`` (default 4).
        check_rules: verify every rule output (shape ``[B, K]``, values in [0, 1]; costs one
            device read per step).
        rule_cache: cache the rules' outputs per training example (``None``: automatic, see above;
            ``False``: never).
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule` (student, teacher,
            teacher_checkpoint, optimizer, lr_scheduler, ...).
    """

    requires_teacher = False
    optimizes_itself = True

    def __init__(self, rules: list[Rule], C: float = 6.0, lambdas: float | list[float] = 1.0,
                 learn_lambda: bool = True, lambda_objective: str = "mean_q",
                 lambda_lr: float = 0.01, learn_phi: bool = True,
                 phi_lr: float = 1e-3, pi_0: float = 0.9, pi_rate: float = 0.95,
                 pi_prime: float = 0.5, phi_objective: str = "r", ce_weight: float = 0.1,
                 kd_weight: float = 0.9, temperature: float = 4.0, check_rules: bool = True,
                 rule_cache: bool | None = None, **kwargs) -> None:
        rules = list(rules) if rules is not None else []
        if not rules:
            raise KDConfigError("MutualDistillation needs at least one rule: set model.init_args.rules "
                                "to a list of class_path entries (e.g. "
                                "kd_lightning.rules.MNIST1DTemplateRule).")
        for i, rule in enumerate(rules):
            if not isinstance(rule, nn.Module):
                raise KDConfigError(f"MutualDistillation: rule {i} is a {type(rule).__name__}, not an "
                                    f"nn.Module (subclass kd_lightning.rules.Rule).")
        if not (isinstance(C, (int, float)) and C >= 0 and math.isfinite(C)):
            raise KDConfigError(f"MutualDistillation: C must be a finite number >= 0, got {C}. It is the "
                                f"strength of the rule constraints (0 makes the teacher q equal to "
                                f"the student p; default 6).")
        for name, value in (("pi_0", pi_0), ("pi_rate", pi_rate), ("pi_prime", pi_prime)):
            if not 0.0 <= value <= 1.0:
                raise KDConfigError(f"MutualDistillation: {name} must be in [0, 1], got {value}.")
        weights = [float(lambdas)] * len(rules) if isinstance(lambdas, (int, float)) else \
            [float(v) for v in lambdas]
        if len(weights) != len(rules):
            raise KDConfigError(
                f"MutualDistillation: lambdas has {len(weights)} entries ({weights}) but there are "
                f"{len(rules)} rules ({', '.join(rule_label(r, i) for i, r in enumerate(rules))}); "
                f"give one number for all rules or one per rule.")
        if any(not (w >= 0 and math.isfinite(w)) for w in weights):
            raise KDConfigError(f"MutualDistillation: every lambda must be a finite number >= 0, "
                                f"got {weights}.")
        if lambda_objective not in LAMBDA_OBJECTIVES:
            raise KDConfigError(f"MutualDistillation: lambda_objective must be 'mean_q' (Eq. 6 of Hu "
                                f"et al. 2016: the mean of q(y)) or 'mean_log_q' (the mean "
                                f"log-likelihood), got {lambda_objective!r}.")
        if phi_objective not in ("r", "log_r"):
            raise KDConfigError(f"MutualDistillation: phi_objective must be 'r' or 'log_r', "
                                f"got {phi_objective!r}.")
        check_temperature("MutualDistillation", temperature)
        check_weights("MutualDistillation", ce_weight=ce_weight, kd_weight=kd_weight)
        if not (lambda_lr > 0 and phi_lr > 0):
            raise KDConfigError(f"MutualDistillation: lambda_lr and phi_lr must be > 0, got {lambda_lr} "
                                f"and {phi_lr} (set learn_lambda / learn_phi to false to freeze).")
        super().__init__(**kwargs)
        # the rule modules live in the state_dict (phi) and the config; keep them out of hparams
        drop_hyperparameter(self, "rules")
        self.rules = nn.ModuleList(rules)
        self.rule_weights = nn.Parameter(torch.tensor(weights, dtype=torch.float32),
                                         requires_grad=learn_lambda)
        self.C, self.learn_lambda, self.lambda_lr = float(C), learn_lambda, lambda_lr
        self.lambda_objective = lambda_objective
        self.learn_phi, self.phi_lr, self.phi_objective = learn_phi, phi_lr, phi_objective
        self.pi_0, self.pi_rate, self.pi_prime = pi_0, pi_rate, pi_prime
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature
        self.check_rules, self.rule_cache = check_rules, rule_cache
        has_phi = [i for i, r in enumerate(rules) if any(p.requires_grad for p in r.parameters())]
        if not learn_phi:
            for rule in rules:
                rule.requires_grad_(False)
            if has_phi:
                warnings.warn(
                    f"MutualDistillation: learn_phi is false, so the parameters (phi) of "
                    f"{', '.join(rule_label(rules[i], i) for i in has_phi)} stay frozen at their "
                    f"initial values.", UserWarning, stacklevel=2)
        elif not has_phi:
            warnings.warn(
                "MutualDistillation: learn_phi is true but no rule has trainable parameters (phi), so "
                "there is no knowledge update (Eq. 5); the rules stay fixed. Use a learnable rule "
                "(e.g. kd_lightning.rules.MNIST1DLearnableTemplateRule) or set learn_phi: false.",
                UserWarning, stacklevel=2)
        self.rule_cache_store = PerExampleCache()  # [num_source_examples, L, K] rule values
        #: per rule with example features (rule_feature_rules), [num_source_examples, ...]
        self.rule_feature_store = PerExampleCache()
        self.rule_feature_rules: list[int] = []
        self._last_pi = 0.0
        #: (global step, [lambda_l], pi) at every logged window, for the inspection figure
        self.weight_history: list[tuple[int, list[float], float]] = []

    # ---- metrics ------------------------------------------------------------------------------
    def build_metrics(self, k: int) -> None:
        super().build_metrics(k)
        for prefix in ("val", "test"):
            setattr(self, f"{prefix}_acc_q", MulticlassAccuracy(num_classes=k, average="micro"))
            setattr(self, f"{prefix}_acc_rule", MulticlassAccuracy(num_classes=k, average="micro"))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and ddp_finds_unused_parameters(self.trainer.strategy) is False:
            raise KDConfigError(
                "MutualDistillation makes three backward passes per batch (lambda, the student, phi), "
                "each reaching only some parameters, so DDP must look for unused parameters: use "
                "--trainer.strategy ddp_find_unused_parameters_true (or "
                "ddp_spawn_find_unused_parameters_true).")
        dm = getattr(self.trainer, "datamodule", None)
        shape = getattr(dm, "input_shape", None)
        if shape is not None and self.check_rules:
            # report a broken rule before anything is trained or written
            x = torch.zeros(2, *shape, device=self.device)
            with torch.no_grad():
                self.rule_values(x)

    # ---- rules and teacher -----------------------------------------------------------------------
    def rule_values(self, x: Tensor, features: list[Tensor | None] | None = None) -> Tensor:
        """``[L, B, K]`` outputs of every rule (mask applied), float32, outside autocast;
        ``features``: each rule's :meth:`~kd_lightning.rules.Rule.example_features` of ``x``, or
        ``None`` (computed by the rule)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return evaluate_rules(self.rules, x, self.num_classes, check=self.check_rules,
                                  features=features)

    def rule_teacher_log_probs(self, student_logits: Tensor, rule_values: Tensor) -> Tensor:
        """``log q`` of the rule teacher (Eq. 2) with the current weights, everything detached."""
        return rule_regularized_teacher(student_logits.detach(), rule_values.detach(),
                                        self.rule_weights.detach(), self.C)

    def rule_predictions(self, rule_values: Tensor) -> Tensor:
        """Class predicted by the rules alone: ``argmax_y sum_l lambda_l r_l(x, y)`` (equal weights
        while every ``lambda`` is 0)."""
        lam = self.rule_weights.detach().clamp_min(0)
        if not bool((lam > 0).any()):
            lam = torch.ones_like(lam)
        return (lam.view(-1, 1, 1) * rule_values).sum(0).argmax(-1)

    def current_pi(self, batch_idx: int) -> float:
        """``pi_t = min(pi_0, 1 - alpha^t)`` with ``t = epoch + batch_idx / batches_per_epoch``."""
        trainer = self.trainer_or_none
        k = self.grouped_fit.k if self.grouped_fit is not None else 1
        n = minibatches_per_epoch(trainer, k) if trainer is not None else float("inf")
        frac = batch_idx / n if isinstance(n, (int, float)) and math.isfinite(n) and n > 0 else 0.0
        return imitation_weight(self.current_epoch + frac, self.pi_0, self.pi_rate)

    def _rules_are_fixed(self) -> bool:
        return not any(p.requires_grad for p in self.rules.parameters())

    def on_train_start(self) -> None:
        super().on_train_start()
        self.rule_cache_store.clear()
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "train_dataset", None)
        if ds is not None and len(ds) > 0 and hasattr(ds, "get_batch") and self.current_epoch == 0:
            x, y, _ = ds.get_batch(torch.arange(len(ds)))
            keep = self.labelled_rows(y)  # the run's labelled examples only
            for rule in self.rules:
                rule.fit_to_labelled(x[keep].to(self.device), y[keep].to(self.device))
        use = (self.rule_cache is not False and self._rules_are_fixed() and ds is not None
               and bool(getattr(dm, "deterministic_train", False)) and len(ds) > 0
               and hasattr(ds, "get_batch"))
        if use:
            self.rule_cache_store.fill(ds, lambda x: [self.rule_values(x).transpose(0, 1)], self.device)
            return
        self.rule_feature_store.clear()
        if (self.rule_cache is False or ds is None or len(ds) == 0 or not hasattr(ds, "get_batch")
                or not bool(getattr(dm, "deterministic_train", False))):
            return
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            probe = ds.get_batch(torch.arange(1))[0].to(self.device)
            self.rule_feature_rules = [i for i, rule in enumerate(self.rules)
                                       if isinstance(rule, Rule) and rule.example_features(probe) is not None]
            if self.rule_feature_rules:
                self.rule_feature_store.fill(
                    ds, lambda x: [self.rules[i].example_features(x) for i in self.rule_feature_rules],
                    self.device)

    def on_train_end(self) -> None:
        super().on_train_end()
        self.rule_cache_store.clear()
        self.rule_feature_store.clear()

    def _train_rule_values(self, x: Tensor, idx: Tensor | None) -> Tensor:
        if idx is not None and self.rule_cache_store.active:
            return self.rule_cache_store.lookup(idx)[0].transpose(0, 1).contiguous()
        if idx is not None and self.rule_feature_store.active:
            features: list[Tensor | None] = [None] * len(self.rules)
            for i, f in zip(self.rule_feature_rules, self.rule_feature_store.lookup(idx)):
                features[i] = f
            return self.rule_values(x, features)
        return self.rule_values(x)

    # ---- optimisation ---------------------------------------------------------------------------
    def optimizer_roles(self) -> list[str]:
        """Which optimisers exist, in the order of ``self.optimizers()``: ``theta`` always, then
        ``phi`` when a rule has parameters to learn, then ``lambda`` when it is learned."""
        roles = ["theta"]
        if self.learn_phi and not self._rules_are_fixed():
            roles.append("phi")
        if self.learn_lambda:
            roles.append("lambda")
        return roles

    def configure_optimizers(self):
        opt_theta = self.build_optimizer([p for p in self.student.parameters() if p.requires_grad])
        optimizers = [opt_theta]
        roles = self.optimizer_roles()
        if "phi" in roles:
            phi = [p for p in self.rules.parameters() if p.requires_grad]
            optimizers.append(torch.optim.Adam(phi, lr=self.phi_lr))
        if "lambda" in roles:
            optimizers.append(torch.optim.Adam([self.rule_weights], lr=self.lambda_lr))
        config = self.lr_scheduler_config(opt_theta)  # the student's schedule
        return optimizers if config is None else (optimizers, [config])

    def minibatch_step(self, batch, batch_idx: int):
        x, y, idx = batch
        opts = self.optimizers()
        opts = dict(zip(self.optimizer_roles(), opts if isinstance(opts, list) else [opts]))
        pi = self.current_pi(batch_idx)
        self._last_pi = pi
        logits = self.student(x)
        r = self._train_rule_values(x, idx)  # [L, B, K]; carries phi's graph when phi is learned
        terms: dict[str, Tensor] = {}

        # Algorithm 1, line 5: the teacher, with the rule weights of Eq. (6) ...
        if "lambda" in opts:
            loss_lambda = rule_weight_loss(logits.detach(), r.detach(), self.rule_weights, y, self.C,
                                           self.lambda_objective)
            self.optimizer_step_manually(opts["lambda"], loss_lambda, counted=False)
            with torch.no_grad():
                self.rule_weights.clamp_(min=0.0)  # projection onto lambda >= 0
            terms["loss_lambda"] = loss_lambda
        # ... and Eq. (2)
        with torch.no_grad():
            log_q = self.rule_teacher_log_probs(logits, r)
            q = log_q.exp()

        # line 6: the student, Eq. (3)
        label_loss = None
        if self.teacher is not None:
            label_loss, _, kd = response_kd_loss(logits, self.teacher_logits(x, idx), y,
                                                 self.temperature, self.ce_weight, self.kd_weight)
            terms["loss_kd"] = kd
        loss, ce, soft = mutual_student_loss(logits, y, q, pi, label_loss=label_loss)
        self.optimizer_step_manually(opts["theta"], loss, counted=True)
        step_manual_lr_schedulers(self, "step", batch_idx + 1)

        # line 7: the knowledge, Eq. (5)
        if "phi" in opts:
            loss_phi = mixed(lambda t: knowledge_loss(r, t, q, self.pi_prime, self.phi_objective), y)
            self.optimizer_step_manually(opts["phi"], loss_phi, counted=False)
            terms["loss_phi"] = loss_phi

        y_acc = target_classes(y)
        acc_q = labelled_mean((log_q.argmax(-1) == y_acc).float(), y_acc)
        self.log_terms(logits, y, loss=loss, loss_ce=ce, loss_q=soft, acc_q=acc_q, **terms)
        return loss.detach()

    def on_train_terms_logged(self) -> None:
        values = {f"train/lambda_{i}": w for i, w in enumerate(self.rule_weights.detach())}
        values["train/pi"] = float(self._last_pi)
        values["train/pi_prime"] = float(self.pi_prime)
        self.log_dict(values, on_step=False, on_epoch=True)
        self._record_weights()

    def _record_weights(self) -> None:
        if not self.weight_history or self.weight_history[-1][0] != self.global_step:
            self.weight_history.append((self.global_step, self.rule_weights.detach().cpu().tolist(),
                                        float(self._last_pi)))

    def inspection_figures(self, batch):
        """Every rule weight lambda_l and the imitation weight pi over the training steps so far
        (one chart, so the rules can be read against each other and against pi)."""
        from kd_lightning.training.figures import weights_over_time_figure

        if self.global_step > 0:
            self._record_weights()
        if not self.weight_history:
            return {}
        steps = [h[0] for h in self.weight_history]
        series = {f"lambda_{i} ({getattr(r, 'rule_name', None) or type(r).__name__})":
                  [h[1][i] for h in self.weight_history] for i, r in enumerate(self.rules)}
        series["pi"] = [h[2] for h in self.weight_history]
        return {"rule_weights_and_pi": weights_over_time_figure(
            steps, series, "MutualDistillation: rule weights lambda_l and imitation weight pi")}

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        step_manual_lr_schedulers(self, "epoch", self.current_epoch + 1)

    # ---- evaluation: student p (base), teacher q and the rules alone ---------------------------
    def _eval_rules(self, batch, logits: Tensor, prefix: str) -> None:
        x, y, _ = batch
        r = self.rule_values(x)
        getattr(self, f"{prefix}_acc_q").update(self.rule_teacher_log_probs(logits.float(), r), y)
        getattr(self, f"{prefix}_acc_rule").update(self.rule_predictions(r), y)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_rules(batch, self.eval_step(batch, "val"), "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_rules(batch, self.eval_step(batch, "test"), "test")

    def _log_rule_metrics(self, prefix: str) -> None:
        q_metric, rule_metric = getattr(self, f"{prefix}_acc_q"), getattr(self, f"{prefix}_acc_rule")
        self.log_dict({f"{prefix}/acc_q": q_metric.compute(), f"{prefix}/acc_rule": rule_metric.compute()},
                      on_step=False, on_epoch=True, sync_dist=True)
        q_metric.reset()
        rule_metric.reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_rule_metrics("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_rule_metrics("test")


"""Trainers of the plugin's models. ``utils.get_trainer`` finds ``<Model>Trainer`` here first."""

import os
import sys
from pathlib import Path
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from tqdm import tqdm

from recbole_mllm import compat, distributed, encoder_warmup_cache, phase_timing, run_state, train_positions
from recbole_mllm.fileio import atomic_output
from recbole_mllm.data import windows
from recbole_mllm.data.dataloader import subset_loader
from recbole_mllm.evaluation import PerUserCollector, keeps_first_stage, one_sided_p, per_user_metric


@encoder_warmup_cache.after_warmup
def check_encoder_freezing(config):
    """``encoder_frozen_after_warmup`` needs a warm-up: checked before the stages run (``split_and_build_model``; they
    can take an hour), and again by ``fit``."""
    if config["encoder_frozen_after_warmup"] and (config["encoder_warmup_epochs"] or 0) <= 0:
        raise ValueError(f"encoder_frozen_after_warmup needs a warm-up (encoder_warmup_epochs > 0, got "
                         f"{config['encoder_warmup_epochs']}); or set encoder_frozen_after_warmup: False")
    if config["ranker_train_rows"] == "trained" and not config["encoder_frozen_after_warmup"]:
        raise ValueError("ranker_train_rows: trained picks a frozen encoder's joint rows (encoder_frozen_after_warmup: "
                         "True); a training encoder reads every row")


class MinimumSteps:
    """Mixin: early stopping may end training only once ``stopping_min_steps`` optimizer steps are taken.

    Patience counted in validations (``stopping_step``) is counted in epochs, and on a small dataset an epoch is a few
    steps: a model then stops while it still predicts popularity (tuned SASRec and GRU4Rec on a few hundred users ended
    after 12-30 epochs of 8-18 steps at the popularity level, where RecBole's default SASRec, with more steps per epoch,
    learnt). Until the minimum is reached no validation stops a run; the best epoch is still kept as usual. Applies to
    every model (``utils.get_trainer`` adds it to RecBole's trainers) and to MLLMSRec's encoder warm-up.
    """

    def __init__(self, config, model):
        self._stopping_step = None
        super().__init__(config, model)
        self.min_steps = max(0, int(config["stopping_min_steps"] or 0))
        self.steps_taken = 0  # optimizer steps, counted by the optimizer itself (every trainer's own epoch loop counts)
        self.optimizer.register_step_post_hook(lambda *_: self._count_step())

    def _count_step(self):
        self.steps_taken += 1

    @property
    def stopping_step(self):
        """RecBole's patience, or no stopping at all while fewer than ``min_steps`` steps are taken."""
        return self._stopping_step if self.steps_taken >= getattr(self, "min_steps", 0) else float("inf")

    @stopping_step.setter
    def stopping_step(self, value):
        self._stopping_step = value


class LearningRateWarmup:
    """Mixin: the learning rate rises linearly from 0 over the first ``lr_warmup_steps`` optimizer steps.

    A post-LayerNorm transformer (RecBole's SASRec, BERT4Rec, the MLLMSRec encoder) at its full learning rate from the
    first step can settle on predicting popularity and stay there: tuned SASRec on ml-1m-mm (learning rate 0.002) did
    on 3 of 4 seeds, with the training loss flat for thousands of steps. The warm-up is the transformers' remedy; it
    applies to every model alike (``utils.get_trainer``), and to MLLMSRec's encoder warm-up (its first steps).
    """

    def _build_optimizer(self, **kwargs):
        optimizer = super()._build_optimizer(**kwargs)
        steps = max(0, int(self.config["lr_warmup_steps"] or 0))
        self.lr_warmup_done = not steps
        self.lr_schedule = None  # kept for the run state (ResumableTraining): where the ramp stands
        if steps:
            schedule = self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 1.0 if self.lr_warmup_done else min(1.0, (step + 1) / steps))
            optimizer.register_step_post_hook(lambda *_: schedule.step())
        return optimizer

    def finish_lr_warmup(self):
        """Train at the full learning rate from now on (MLLMSRec's joint epochs: the ramp belongs to its encoder's
        warm-up, whether that ran in this process or was read from its cache)."""
        self.lr_warmup_done = True
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])


def process_checkpoint_file(recbole_file, seed):
    """RecBole's checkpoint name (``<model>-<local time to the second>.pth``) with the seed and the process id added.

    Runs started in the same second from one folder (seeds of one model, queued together) otherwise share one file: on
    2026-12-07 three FusedSASRec seeds on ml-100k each tested whichever best epoch was written last, and reported one
    model's metrics three times. Ranks of one torchrun run still share rank 0's name (``distributed.DataParallel``).
    """
    path = Path(recbole_file)
    return str(path.with_name(f"{path.stem}-seed{seed}-pid{os.getpid()}{path.suffix}"))


class ResumableTraining:
    """Mixin: a run stopped with its machine continues from its last finished epoch (``run_state``).

    Rented or shared GPU machines are taken back (spot instances, time-limited slots), and a long run lost everything
    it trained. After each finished epoch (and its validation) the run's state is written to
    ``<stage_cache_dir>/run_state/<hash>.pth``, which travels with the stage caches; with ``resume_training`` an identical run (same config, data and code) reads it and
    goes on at the next epoch, as if never stopped (random generators included). A run that had ended (all epochs, or
    early stopping) trains nothing and is tested on its best epoch, whose weights the state carries. RecBole's ``fit``
    loop runs unchanged: the state of epoch ``e`` is written as epoch ``e + 1`` starts, and once more when the loop ends.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.saved_model_file = process_checkpoint_file(self.saved_model_file, config["seed"])
        self.resume_training = bool(config["resume_training"])
        self.run_state_file = None  # fit: this run's state file
        self.run_finished = False  # a resumed run that had ended: fit trains nothing
        self._run_state_lock = None
        self._resume_checked = False
        self._best_weights = None  # the weights RecBole last checkpointed (the best epoch), for the run state
        self._pending_rng = None  # a resumed run's generators, set as its first epoch starts

    def _epoch_loaders(self, train_data):
        """The loaders a training epoch of ``fit`` reads (their shuffling generators are part of the state)."""
        return (train_data,)

    @contextmanager
    def run_state_held(self):
        """The run state's lock held (reentrant: a trainer's own ``fit`` may take it before RecBole's loop does), and
        the run resumed from its state the first time, when ``resume_training`` is on."""
        if self._run_state_lock is None:  # a run that starts over waits for no other
            self.run_state_file = run_state.state_path(self.config, self.model)
            self._run_state_lock = distributed.file_lock(self.run_state_file) if self.resume_training else nullcontext()
        with self._run_state_lock:
            if self.resume_training and not self._resume_checked and distributed.file_exists(self.run_state_file):
                self._resume(run_state.load(self.run_state_file, self.device))
            self._resume_checked = True
            yield

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        with self.run_state_held():
            if self.run_finished:
                self.eval_collector.data_collect(train_data)  # what RecBole's fit collects for the test's metrics
                return self.best_valid_score, self.best_valid_result
            with self._saving_each_epoch(train_data):
                result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
            if self.train_loss_dict:
                self._save_run_state(max(self.train_loss_dict), train_data, finished=True)
            return result

    @contextmanager
    def _saving_each_epoch(self, train_data):
        """RecBole's loop with the state of the epoch before written as each epoch starts (a resumed run's
        generators set as its first one starts, after whatever ran between ``fit``'s start and it)."""
        first_epoch, train_epoch = self.start_epoch, self._train_epoch
        shadowed = self.__dict__.get("_train_epoch")  # a test's stand-in stays in place

        def train_epoch_after_saving(data, epoch_idx, *args, **kwargs):
            if epoch_idx > first_epoch:
                self._save_run_state(epoch_idx - 1, train_data)
            if self._pending_rng is not None:
                run_state.set_rng_states(self._pending_rng, self._epoch_loaders(train_data))
                self._pending_rng = None
            return train_epoch(data, epoch_idx, *args, **kwargs)

        self._train_epoch = train_epoch_after_saving
        try:
            yield
        finally:
            if shadowed is None:
                del self._train_epoch
            else:
                self._train_epoch = shadowed

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        super()._save_checkpoint(epoch, verbose=verbose, **kwargs)
        if distributed.is_main() and "saved_model_file" not in kwargs:
            self._best_weights = {"epoch": epoch, "other_parameter": self.model.other_parameter(),
                                  "state_dict": {k: v.detach().to("cpu", copy=True)
                                                 for k, v in self.model.state_dict().items()}}

    def _save_run_state(self, epoch, train_data, finished=False):
        rng = distributed.gather(run_state.rng_states(self._epoch_loaders(train_data)))  # each rank's own (torchrun)
        if not distributed.is_main():
            return
        run_state.save(self.run_state_file, {
            "epoch": epoch, "finished": finished, "stopped_early": finished and epoch + 1 < self.epochs,
            "model": self.model.state_dict(), "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(), **self._step_counters(), "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": dict(self.best_valid_result) if self.best_valid_result is not None else None,
            "train_loss_dict": dict(self.train_loss_dict), "best": self._best_weights,
            "rng": rng})

    def _step_counters(self):
        """Where the learning-rate warm-up and the step floor stand (``LearningRateWarmup``, ``MinimumSteps``)."""
        schedule = getattr(self, "lr_schedule", None)
        return {"lr_warmup_done": getattr(self, "lr_warmup_done", True),
                "lr_schedule": schedule.state_dict() if schedule is not None else None,
                "steps_taken": getattr(self, "steps_taken", 0)}

    def _restore_step_counters(self, state):
        self.lr_warmup_done = state["lr_warmup_done"]
        if state["lr_schedule"] is not None and getattr(self, "lr_schedule", None) is not None:
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.steps_taken = state["steps_taken"]

    def _resume(self, state):
        self.model.load_state_dict(state["model"])
        self.model.load_other_parameter(state["other_parameter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._restore_step_counters(state)
        self.cur_step = state["cur_step"]
        self.best_valid_score, self.best_valid_result = state["best_valid_score"], state["best_valid_result"]
        self.train_loss_dict = dict(state["train_loss_dict"])
        self._best_weights, self._pending_rng = state["best"], run_state.rank_rng(state["rng"], self.run_state_file)
        self.start_epoch, self.run_finished = state["epoch"] + 1, state["finished"]
        if self._best_weights is not None:
            self._write_best_checkpoint()
        best = f"best valid {self.valid_metric} {self.best_valid_score:.4f}" if self.best_valid_result else "never validated"
        ended = "; it had stopped early" if state["stopped_early"] else ""
        self.logger.info(f"resumed {self.run_state_file}: epoch {self.start_epoch} of {self.epochs} done, {best}{ended}")

    def _write_best_checkpoint(self):
        """The best epoch's weights as RecBole's checkpoint at ``saved_model_file`` (with the resumed optimizer), where
        testing (``evaluate(load_best_model=True)``, ``quick_start.run``) reads them."""
        if distributed.is_main():
            best = self._best_weights
            with atomic_output(self.saved_model_file) as f:
                torch.save({"config": self.config, "epoch": best["epoch"], "cur_step": self.cur_step,
                            "best_valid_score": self.best_valid_score, "state_dict": best["state_dict"],
                            "other_parameter": best["other_parameter"], "optimizer": self.optimizer.state_dict()},
                           f, pickle_protocol=4)
        distributed.barrier()


class PhaseTiming:
    """Mixin: training epochs and validations timed as phases of the run (``phase_timing``, the record's
    ``phase_seconds``). Placed before the trainer's own class (``with_training_policies``), so a trainer's own
    ``_train_epoch`` is timed too."""

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        with phase_timing.phase("train"):
            return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)

    def _valid_epoch(self, valid_data, *args, **kwargs):
        with phase_timing.phase("valid"):
            return super()._valid_epoch(valid_data, *args, **kwargs)


TRAINING_POLICIES = (LearningRateWarmup, MinimumSteps, train_positions.AllPositionsLoss, ResumableTraining, PhaseTiming)
"""The mixins every trainer gets (``with_training_policies``): one training budget for every compared model, the
loss ``train_positions: all`` asks for, runs that survive their machine, and the time each phase took."""


def with_training_policies(trainer_class):
    """``trainer_class`` with every mixin of :data:`TRAINING_POLICIES` it does not have yet."""
    missing = tuple(policy for policy in TRAINING_POLICIES if not issubclass(trainer_class, policy))
    if not missing:
        return trainer_class
    return type(trainer_class.__name__, (*missing, trainer_class), {"__doc__": trainer_class.__doc__})


class MLLMSRecTrainer(LearningRateWarmup, MinimumSteps, ResumableTraining, Trainer):
    """RecBole's trainer loop with what an LLM ranker needs.

    * an encoder warm-up (at most ``encoder_warmup_epochs``, early-stopped on the validation metric after
      ``encoder_warmup_stopping_step`` epochs without gain, best encoder kept) before the LLM joins: a
      curriculum from the collaborative encoder alone to hybrid prompts, so soft tokens carry a converged
      collaborative signal from the first LLM step and the first stage of full ranking is a good retriever;
    * gradient accumulation (``gradient_accumulation_steps``) and bfloat16 autocast on GPU
      (``enable_amp``; RecBole's own autocast would pick float16);
    * with the encoder frozen, the LLM's rows of a step run forward and backward ``ranker_train_rows_per_forward`` at
      a time (the step's gradient is the sum of theirs), so a step keeps the activations of those rows only;
    * only trainable parameters in the optimizer; checkpoints hold only trained tensors (the model's
      ``state_dict``) plus the base model's identity, and resume through ``compat.load_checkpoint``;
    * the first stage's recall is logged after every full-ranking evaluation, and with ``report_first_stage``
      every evaluation is repeated with the encoder alone and logged beside it (and, under late fusion, with the
      LLM's score alone: what fusion adds).
    * with ``late_fusion_grid``, the late-fusion weight is chosen on the validation set after training.

    It reads the model only through methods: RecBole's contract (``calculate_loss``, ``predict``,
    ``full_sort_predict``, ``other_parameter``/``load_other_parameter``) and MLLMSRec's trainer interface
    (``encoder_loss``, ``loss_parts``, ``scoring``, ``uses_llm``, ``first_stage_recall``, ``freeze_encoder``, ``llm_rows``,
    ``warmup_inputs``, ``encoder_state``/``load_encoder_state``, ``late_fusion_grid``/``first_stage_fallback_alpha``/
    ``use_fusion_weight``/``fusion_weight``/``use_first_stage_only``/``first_stage_only``/
    ``reuse_llm_scores``; ``model/mllmsrec/model.py``).
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.accumulation_steps = max(1, int(config["gradient_accumulation_steps"] or 1))
        self.warmup_epochs = int(config["encoder_warmup_epochs"] or 0)
        self.warmup_stopping_step = int(config["encoder_warmup_stopping_step"] or 0)
        # the path of a validated warm-up when it can validate; fit's warm-up sets the path of what it runs
        self.warmup_cache = self._warmup_cache_path(self.warmup_stopping_step > 0) if config["encoder_warmup_cache"] else None
        self.use_bf16 = bool(config["enable_amp"]) and self.device.type == "cuda"
        self.skipped_steps = 0
        self.report_first_stage = bool(config["report_first_stage"])
        self.last_first_stage_result = None
        self.last_first_stage_seen_share = None  # full ranking: already-seen items in the unmasked first stage's top-k
        self.last_first_stage_recall = None  # full ranking: the targets in the first stage's top rerank_top_k, 50, 100
        self.last_llm_alone_result = None  # under late fusion, the same evaluation with the LLM's score alone
        self.last_chosen_weight_result = None  # where the first stage ranked the test: the weight validation chose
        self.joint_rows = None  # with a frozen encoder, the joint epochs read only the LLM's rows (fit)
        self.fusion_selection = None  # late_fusion_grid: every weight's validation score and the one chosen (fit)
        if not isinstance(self.eval_collector, PerUserCollector):  # the fusion choice pairs validation users
            self.eval_collector = PerUserCollector(config)
        rows = config["ranker_train_rows_per_forward"]
        self.rows_per_forward = int(rows) if rows is not None else (None if self.device.type == "cuda" else 1)

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(**kwargs)

    def sync_grad_loss(self):
        """RecBole's zero term that puts every trained parameter in each step's loss (so DDP reduces them all), over
        the trained ones only: the frozen LLM would add a sum over all its weights and no gradient."""
        return sum((p.sum() * 0 for p in self.model.parameters() if p.requires_grad), torch.zeros((), device=self.device))

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if loss_func is None and self.joint_rows is not None:  # a joint epoch of a frozen encoder: the LLM's rows alone
            train_data = self.joint_rows
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        total_loss = 0.0
        iter_data = tqdm(train_data, total=len(train_data), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink")) \
            if show_progress else train_data
        self.optimizer.zero_grad()
        if distributed.active() and getattr(train_data, "shuffle", False):
            train_data.sampler.set_epoch(epoch_idx)
        for batch_idx, interaction in enumerate(iter_data):
            sync_loss = 0.0
            if distributed.active():  # RecBole's DDP path: every rank's gradients are averaged in backward
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            parts = self._loss_parts(interaction.to(self.device), loss_func)
            while True:
                with self._autocast():
                    part = next(parts, None)
                if part is None:
                    break
                loss, sync_loss = part + sync_loss, 0.0
                self._check_nan(loss)
                if loss.requires_grad:  # a frozen encoder and no LLM row in the batch: nothing to train on it
                    (loss / self.accumulation_steps).backward()
                total_loss += loss.item()
            if (batch_idx + 1) % self.accumulation_steps == 0 or batch_idx + 1 == len(train_data):
                self._step()
        return total_loss

    def _loss_parts(self, interaction, loss_func):
        """The step's loss as parts to backpropagate one by one, each computed when asked for: in a joint epoch of a
        frozen encoder on one process the LLM's rows ``rows_per_forward`` at a time (``loss_parts``; the activations of
        one part alive at a time, the step's gradient their sum), else the whole loss. Under torchrun every rank
        backpropagates once per step (its gradient hooks reduce across ranks)."""
        if self.joint_rows is not None and loss_func == self.model.calculate_loss and not distributed.active():
            return self.model.loss_parts(interaction, self.rows_per_forward)
        return (loss_func(interaction) for _ in range(1))

    def _step(self):
        """Clip and apply the summed gradients, or skip the update when any is inf/NaN (as AMP's GradScaler does).

        On ml-1m-mm a finite loss once gave NaN gradients in the encoder (step 227 of a joint epoch); one
        such update makes every later loss NaN. Skipped updates are counted and logged.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, **(self.clip_grad_norm or {"max_norm": float("inf")}))
        if torch.isfinite(norm):
            self.optimizer.step()
        else:
            self.skipped_steps += 1
            self.logger.warning(f"skipped an update with non-finite gradients ({self.skipped_steps} so far)")
        self.optimizer.zero_grad()

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        with self.run_state_held():  # resumed first: a resumed run skips the warm-up, its joint rows follow its encoder
            return self._fit_resumed(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def _epoch_loaders(self, train_data):
        return (train_data,) if self.joint_rows is None else (train_data, self.joint_rows)

    def _fit_resumed(self, train_data, valid_data, verbose, saved, show_progress, callback_fn):
        if self.start_epoch == 0 and self.warmup_epochs > 0:
            with phase_timing.phase("warmup"):
                self._warm_up_encoder(train_data, valid_data, verbose, show_progress)
            self.steps_taken = 0  # the joint epochs count their own steps
            self.finish_lr_warmup()  # and run at the full rate, the same after a reused warm-up as after a trained one
        if self.config["encoder_frozen_after_warmup"]:
            check_encoder_freezing(self.config)
            self.model.freeze_encoder()
            if distributed.active():  # DDP averages the gradients of what requires them when it is built
                self.distributed_model = distributed.ddp(self.model, self.device)
            with phase_timing.phase("llm_rows"):
                self.joint_rows = self._llm_rows(train_data)
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if self.model.late_fusion_grid and valid_data is not None:
            if saved and os.path.isfile(self.saved_model_file):  # choose for the checkpoint that is tested
                checkpoint = compat.load_checkpoint(self.saved_model_file, map_location=self.device)
                self.model.load_state_dict(checkpoint["state_dict"])
                self.model.load_other_parameter(checkpoint.get("other_parameter"))
            with phase_timing.phase("fusion"):
                self.fusion_selection = self.select_fusion_weight(valid_data, show_progress)
        if self.warmup_cache is None and self.run_state_file is not None and distributed.is_main():
            self._warmup_progress_file().unlink(missing_ok=True)  # the finished run's state holds the encoder now
        return result

    @encoder_warmup_cache.after_warmup
    @torch.no_grad()
    def select_fusion_weight(self, valid_data, show_progress=False):
        """Late fusion chosen on validation: each weight of ``late_fusion_grid`` scores the validation set (the LLM
        scores each user's list once for all of them), and the best by ``valid_metric`` (the first of ties) is kept
        for testing.

        The first stage alone scores the validation set too, and the best weight's per-user ``valid_metric`` is tested
        against it (one-sided paired Wilcoxon, Bonferroni-corrected for the grid's weights, since the best of them is the
        one tested): with ``first_stage_fallback_alpha`` set, a p at or above it, or a best weight whose mean is not above
        the first stage's (Wilcoxon ranks the sizes of the differences, so many small gains can outweigh a few large
        losses), keeps the first stage for testing: the LLM ranks only where validation says it adds something. Returns
        ``{"weights", "valid_scores", "chosen", "first_stage_valid_score", "p_over_first_stage", "first_stage",
        "first_stage_fallback_alpha"}`` for the run's record."""
        weights = [float(w) for w in self.model.late_fusion_grid]
        masks_history = getattr(valid_data, "masks_history", None)
        collector = self.eval_collector
        recording, collector.recording = collector.recording, True
        start = len(collector.evaluations)
        try:
            with self.model.reuse_llm_scores():
                for weight in weights:
                    with self._autocast(), self.model.scoring(fusion_weight=weight, mask_history=masks_history):
                        super().evaluate(valid_data, load_best_model=False, show_progress=show_progress)
            with self._autocast(), self.model.scoring(encoder_only=True, mask_history=masks_history):
                super().evaluate(valid_data, load_best_model=False, show_progress=show_progress)
            evaluations = collector.evaluations[start:]
        finally:
            del collector.evaluations[start:]
            collector.recording = recording
        if len(evaluations) != len(weights) + 1:
            raise RuntimeError(f"late fusion: {len(evaluations)} validation passes recorded, {len(weights) + 1} run")
        per_user = [per_user_metric(e, self.valid_metric) for e in evaluations]
        places = self.config["metric_decimal_place"]  # the scores RecBole reports, so ties are those a reader sees
        scores = [round(float(values.mean()), places) for _, values in per_user[:-1]]
        best = scores.index(max(scores))
        (users, first_stage), (best_users, best_values) = per_user[-1], per_user[best]
        if not np.array_equal(users, best_users):
            raise RuntimeError("late fusion: the first stage and the LLM scored different validation users")
        p_value = min(1.0, one_sided_p(best_values, first_stage) * len(weights))
        first_stage_score = round(float(first_stage.mean()), places)
        alpha = self.model.first_stage_fallback_alpha
        fallback = alpha is not None and keeps_first_stage(p_value, alpha, best_values.mean(), first_stage.mean())
        chosen = weights[best]
        self.model.use_fusion_weight(chosen)
        self.model.use_first_stage_only(fallback)
        self.logger.info(f"late fusion on validation ({self.valid_metric}): "
                         + ", ".join(f"w={w:g}: {v:.4f}" for w, v in zip(weights, scores))
                         + f"; first stage alone: {first_stage_score:.4f}; w={chosen:g} over the first stage: one-sided "
                         f"p = {p_value:.3g} (Bonferroni over {len(weights)} weights); "
                         + (f"the first stage ranks the test (first_stage_fallback_alpha = {alpha:g})" if fallback
                            else f"chosen w={chosen:g}"))
        return {"weights": weights, "valid_scores": scores, "chosen": chosen,
                "first_stage_valid_score": first_stage_score, "p_over_first_stage": p_value, "first_stage": fallback,
                "first_stage_fallback_alpha": alpha}

    @encoder_warmup_cache.after_warmup
    def _llm_rows(self, train_data):
        """A loader of the training rows the LLM trains on, ``ranker_train_batch_size`` rows per step.

        With the encoder frozen no other row trains anything: RecBole's ~1M rows of ML-1M hold ~12k of them, so a joint
        epoch over all rows would spend almost every step on an encoder forward that is thrown away. The rows are
        chosen by the model's own rule (``TrainingCandidates.llm_rows``), so they are exactly those a full epoch reads.
        Under ``top_k`` only those whose target is inside the frozen encoder's top-K train (``llm_trained_rows``,
        counted here); with ``ranker_train_rows: all`` the others stay in the batches, so each step trains on the rows
        it holds, as measured before the key; with ``trained`` the batches hold those rows alone (the same set every
        epoch: the encoder is frozen), ``ranker_train_batch_size`` training lists a step.
        """
        inter, rows, keep, chunk = train_data.dataset.inter_feat, [], 0, 65536
        trained_only = self.config["ranker_train_rows"] == "trained"
        for start in range(0, len(inter), chunk):
            with self._autocast():  # the precision of the joint steps, whose own top-K decides what trains
                part_rows, trained = self.model.llm_rows(inter[start:start + chunk])
            rows += [start + row for row in (trained if trained_only else part_rows)]
            keep += len(trained)
        self.logger.info(f"encoder frozen: the joint epochs read {len(rows)} rows (of {len(inter)}; "
                         f"ranker_train_rows: {self.config['ranker_train_rows']}), "
                         f"{self.config['ranker_train_batch_size']} per step; {keep} of them train the LLM")
        if not keep:  # an untrained reranker would be tested as if it were MLLMSRec's
            raise ValueError(f"no training row can train the LLM: no training target is inside the warmed-up encoder's top "
                             f"rerank_top_k={self.config['rerank_top_k']} (ranker_train_candidates: top_k); raise rerank_top_k "
                             f"or llm_train_targets_per_user (the warm-up is cached and reused)")
        return subset_loader(self.config, train_data, rows, self.config["ranker_train_batch_size"])

    def _warmup_validates(self, valid_data):
        """Whether a warm-up early-stops on validation (and keeps its best encoder) or runs every epoch."""
        return valid_data is not None and self.warmup_stopping_step > 0

    def _warmup_cache_path(self, validated):
        """The file of this trainer's warm-up (``encoder_warmup_cache.cache_path``; ``validated``: whether it
        early-stops on validation and keeps its best encoder)."""
        code = encoder_warmup_cache.code_sha256(self.model, sys.modules[__name__])
        return encoder_warmup_cache.cache_path(self.config, self.model, self.device.type, code, validated)

    def _warm_up_encoder(self, train_data, valid_data, verbose, show_progress):
        """Warm the encoder up, or reuse the encoder an identical configuration warmed up (``encoder_warmup_cache``):
        under the file's lock, so a run that waited for another's warm-up reuses it."""
        if self.warmup_cache is None:
            self._train_encoder(train_data, valid_data, verbose, show_progress)
            return
        self.warmup_cache = self._warmup_cache_path(self._warmup_validates(valid_data))
        with distributed.file_lock(self.warmup_cache):
            self._warm_up_or_reuse(train_data, valid_data, verbose, show_progress)

    def _warm_up_or_reuse(self, train_data, valid_data, verbose, show_progress):
        if distributed.file_exists(self.warmup_cache):
            if distributed.is_main():  # a progress file left by a run stopped between saving the cache and removing it
                encoder_warmup_cache.progress_path(self.warmup_cache).unlink(missing_ok=True)
            saved = encoder_warmup_cache.load(self.warmup_cache, self.device)
            self.model.load_encoder_state(saved["encoder"])
            self.logger.info(f"encoder warm-up reused from {self.warmup_cache} "
                             f"(best valid {self.valid_metric} {saved['best_score']:.4f} after {saved['epochs']} epochs)")
            return
        best_score, epochs = self._train_encoder(train_data, valid_data, verbose, show_progress)
        if distributed.is_main():
            encoder_warmup_cache.save(self.warmup_cache, self.model.encoder_state(), best_score, epochs)
            encoder_warmup_cache.progress_path(self.warmup_cache).unlink(missing_ok=True)  # the cache holds it now
            self.logger.info(f"warmed-up encoder saved to {self.warmup_cache}")

    def _warmup_rows(self, train_data):
        """What the warm-up trains on, and its loss: ``train_positions: all`` gives window rows with the loss at every
        position (as FusedSASRec trains; ``encoder_warmup_batch_size`` windows per step), ``last`` the joint
        epochs' own rows with the loss at their last position."""
        batch_size = self.config["encoder_warmup_batch_size"] or self.config["train_batch_size"]
        if self.config["train_positions"] == "all":
            return (windows.window_loader(self.config, train_data, batch_size),
                    lambda interaction: train_positions.all_positions_loss(self.model, interaction))
        if batch_size != self.config["train_batch_size"]:
            raise ValueError("encoder_warmup_batch_size applies to train_positions: all (window rows) only")
        return train_data, self.model.encoder_loss

    def _train_encoder(self, train_data, valid_data, verbose, show_progress):
        """Train the encoder alone (the model scores with it meanwhile: ``scoring(encoder_only=True)``); keep its
        best validated state.

        Returns ``(best valid score or None, epochs run)``.
        """
        validate = self._warmup_validates(valid_data)
        warmup_data, loss_func = self._warmup_rows(train_data)
        progress_file = self._warmup_progress_file()
        best_score, best_state, stale, epoch, done = None, None, 0, -1, False
        if progress_file is not None and self.resume_training and distributed.file_exists(progress_file):
            best_score, best_state, stale, epoch, done = self._resume_warmup(progress_file, warmup_data)
        use_bf16, self.use_bf16 = self.use_bf16, False  # float32, as FusedSASRec trains under RecBole's trainer
        with self.model.scoring(encoder_only=True):
            for epoch in range(epoch + 1, 0 if done else self.warmup_epochs):
                loss = self._train_epoch(warmup_data, epoch, loss_func, show_progress)
                message = f"encoder warm-up epoch {epoch}: train loss {loss:.4f}"
                if validate:
                    score, _ = self._valid_epoch(valid_data, show_progress=show_progress)
                    message += f", valid {self.valid_metric} {score:.4f}"
                    better = best_score is None or (score > best_score if self.valid_metric_bigger else score < best_score)
                    if better:
                        best_score, stale = score, 0
                        best_state = {k: v.detach().clone() for k, v in self.model.encoder_state().items()}
                    else:
                        stale += 1
                if verbose:
                    self.logger.info(message)
                done = validate and stale >= self.warmup_stopping_step and self.steps_taken >= self.min_steps
                if progress_file is not None:
                    self._save_warmup_progress(progress_file, warmup_data, epoch, best_score, best_state, stale,
                                               done or epoch + 1 == self.warmup_epochs)
                if done:
                    break
        self.use_bf16 = use_bf16
        if best_state is not None:
            self.model.load_encoder_state(best_state)
            if verbose:
                self.logger.info(f"encoder warm-up done: best valid {self.valid_metric} {best_score:.4f} kept")
        return best_score, epoch + 1

    def _warmup_progress_file(self):
        """Where the warm-up keeps its last finished epoch: beside its cache file (under the same lock, so a run that
        waited for it goes on with it), else beside the run's state; None outside ``fit``."""
        if self.warmup_cache is not None:
            return encoder_warmup_cache.progress_path(self.warmup_cache)
        if self.run_state_file is not None:
            return self.run_state_file.with_name(f"{self.run_state_file.stem}.warmup.pth")
        return None

    def _optimizer_parameter_names(self):
        """The model's parameter names in the optimizer's own order (its state dict numbers them so)."""
        names = {id(parameter): name for name, parameter in self.model.named_parameters()}
        return [names[id(parameter)] for group in self.optimizer.param_groups for parameter in group["params"]]

    def _save_warmup_progress(self, path, warmup_data, epoch, best_score, best_state, stale, done):
        """A warm-up epoch's end, written atomically (``run_state.save``): all a stopped warm-up needs to go on as
        if never stopped, random generators included."""
        rng = distributed.gather(run_state.rng_states([warmup_data]))
        if not distributed.is_main():
            return
        optimizer = self.optimizer.state_dict()
        names = self._optimizer_parameter_names()
        run_state.save(path, {
            "epoch": epoch, "done": done, "encoder": self.model.encoder_state(), "best_score": best_score,
            "best_state": best_state, "stale": stale,
            # by parameter name: runs sharing a warm-up may differ in the ranker's trainable parameters (only the
            # encoder's have optimizer state in a warm-up)
            "optimizer_state": {names[index]: value for index, value in optimizer["state"].items()},
            "optimizer_groups": [{k: v for k, v in group.items() if k != "params"} for group in optimizer["param_groups"]],
            **self._step_counters(), "rng": rng})

    def _resume_warmup(self, path, warmup_data):
        """The warm-up as a stopped run left it; returns ``(best_score, best_state, stale, last epoch, done)``."""
        progress = run_state.load(path, self.device)
        self.model.load_encoder_state(progress["encoder"])
        optimizer, index = self.optimizer.state_dict(), {n: i for i, n in enumerate(self._optimizer_parameter_names())}
        unknown = sorted(set(progress["optimizer_state"]) - set(index))
        if unknown or len(progress["optimizer_groups"]) != len(optimizer["param_groups"]):
            raise run_state.RunStateError(f"the warm-up progress {path} trained parameters this model does not train "
                                          f"({unknown[:3]}); delete it or run with --resume_training=False")
        optimizer["state"] = {index[name]: value for name, value in progress["optimizer_state"].items()}
        for group, saved in zip(optimizer["param_groups"], progress["optimizer_groups"]):
            group.update(saved)
        self.optimizer.load_state_dict(optimizer)
        self._restore_step_counters(progress)
        run_state.set_rng_states(run_state.rank_rng(progress["rng"], path), [warmup_data])
        best = "never validated" if progress["best_score"] is None else \
            f"best valid {self.valid_metric} {progress['best_score']:.4f}"
        self.logger.info(f"encoder warm-up resumed from {path}: epoch {progress['epoch'] + 1} done, {best}")
        return progress["best_score"], progress["best_state"], progress["stale"], progress["epoch"], progress["done"]

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        self.last_first_stage_result = self.last_first_stage_seen_share = self.last_llm_alone_result = None
        self.last_first_stage_recall = self.last_chosen_weight_result = None
        self.last_first_stage_is_test = False
        if load_best_model:
            checkpoint = compat.load_checkpoint(model_file or self.saved_model_file, map_location=self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
        recall = self.model.first_stage_recall
        recall.reset()
        masks_history = getattr(eval_data, "masks_history", None)  # the loader's protocol: the first stage's mask too
        first_stage_only = self.model.first_stage_only  # late fusion kept the first stage: it ranks, the LLM is reported
        has_llm = self.model.uses_llm or first_stage_only  # not the warm-up's encoder-only evaluations
        fused = self.report_first_stage and has_llm and (self.model.fusion_weight != 0 or first_stage_only)
        with self.model.reuse_llm_scores() if fused else nullcontext():  # the LLM-alone pass reuses the LLM's scores
            with self._autocast(), self.model.scoring(encoder_only=not self.model.uses_llm, mask_history=masks_history):
                result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
            if recall.users:
                self._log_first_stage_recall(recall)
            if self.report_first_stage and has_llm:
                # under the fallback the main pass was the first stage's (same function, same mask): not scored twice
                self.last_first_stage_is_test = first_stage_only
                self.last_first_stage_result = result if first_stage_only else self._first_stage_alone(eval_data,
                                                                                                       show_progress)
                self.logger.info(f"first stage alone (the encoder's order, no LLM): {dict(self.last_first_stage_result)}")
            if fused:  # per-user records come in the order main, [first stage], [chosen], LLM alone
                if first_stage_only and self.model.fusion_weight != 0:  # the weight the fallback set aside, reported
                    with self._autocast(), self.model.scoring(mask_history=masks_history):
                        self.last_chosen_weight_result = super().evaluate(eval_data, load_best_model=False,
                                                                          show_progress=show_progress)
                    self.logger.info(f"the weight validation chose (w={self.model.fusion_weight:g}, not tested: the "
                                     f"first stage ranks): {dict(self.last_chosen_weight_result)}")
                    recall.reset()  # counted again by the LLM-alone pass
                with self._autocast(), self.model.scoring(fusion_weight=0.0, mask_history=masks_history):
                    self.last_llm_alone_result = super().evaluate(eval_data, load_best_model=False,
                                                                  show_progress=show_progress)
                self.logger.info(f"LLM alone (late fusion off): {dict(self.last_llm_alone_result)}")
                if first_stage_only and recall.users:  # the main pass did not rerank: the LLM-alone pass counted
                    self._log_first_stage_recall(recall)
        return result

    @encoder_warmup_cache.after_warmup
    def _log_first_stage_recall(self, recall):
        self.last_first_stage_recall = recall.at()
        self.logger.info(f"stage-1 {', '.join(f'{k}: {v:.4f}' for k, v in self.last_first_stage_recall.items())} "
                         f"({recall.users} users); already-seen items in the unmasked stage-1 top 10: "
                         f"{recall.seen_share(10):.1%}, top 20: {recall.seen_share(20):.1%}")
        self.last_first_stage_seen_share = {f"seen@{k}": recall.seen_share(k) for k in recall.seen_in_top}

    @encoder_warmup_cache.after_warmup
    @torch.no_grad()
    def _first_stage_alone(self, eval_data, show_progress):
        """The same evaluation scored by the encoder alone: what the LLM reranker adds is the difference."""
        with self.model.scoring(encoder_only=True, mask_history=getattr(eval_data, "masks_history", None)), self._autocast():
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def resume_checkpoint(self, resume_file):
        checkpoint = compat.load_checkpoint(resume_file, map_location=self.device)
        self.saved_model_file = str(resume_file)
        self.start_epoch, self.cur_step = checkpoint["epoch"] + 1, checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

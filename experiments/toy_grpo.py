"""SFT -> GRPO on the embedded toy task with its verifiable rewards, ending with the per-axis table SFT vs GRPO and
the KL to the reference.

    python experiments/toy_grpo.py --workdir=/tmp/align_jax_toy

1. SFT: the SFT stage of experiments/toy_pipeline.py (same workdir layout: an existing <workdir>/sft/export is
   reused, e.g. from a toy_pipeline.py run).
2. GRPO (configs/grpo.py) from the SFT export on the toy prompt-only set: G samples per prompt, scored by the toy
   task's programs (rewards.functions, default the gold reward), group-relative advantages, clipped surrogate;
   the frozen reference is the SFT model, so the KL to it is logged every step.
3. Both policies answer the held-out prompts greedily and are scored per axis (toy_pipeline.evaluate_policy).
Writes <workdir>/results_grpo.json, results_grpo.md and grpo_reward.png (training reward and KL per step).
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_pipeline as tp  # noqa: E402  (its flags: --workdir, --sft_steps, --eval_prompts, ...)

# Defaults (0 / "" / None) keep configs/grpo.py's values: 100 steps of 8 prompts x 8 samples, lr 3e-4, T = 1,
# beta = 0, loss grpo (dapo), reward toy_gold.
flags.DEFINE_integer("grpo_steps", 0, "GRPO steps.")
flags.DEFINE_integer("grpo_batch", 0, "Prompts per GRPO step.")
flags.DEFINE_integer("num_generations", 0, "Completions per prompt (G).")
flags.DEFINE_float("grpo_lr", None, "GRPO learning rate (constant).")
flags.DEFINE_float("temperature", None, "Sampling temperature.")
flags.DEFINE_float("beta", None, "KL coefficient (the KL to the reference is logged either way).")
flags.DEFINE_string("grpo_loss", "", "GRPO variant (grpo, grpo:dr_grpo, grpo:gspo, ...).")
flags.DEFINE_list("rewards", None, "Reward functions (registered names or module:function), weights 1.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    wd, t0, sft_path = tp.start()
    c = tp._config("grpo", wd)
    c.loss.name = FLAGS.grpo_loss or c.loss.name
    if FLAGS.beta is not None:
        c.loss.kwargs.beta = FLAGS.beta
    if FLAGS.rewards:
        c.rewards.functions = tuple(FLAGS.rewards)
        c.rewards.weights = (1.0,) * len(FLAGS.rewards)
    c.batch_size = FLAGS.grpo_batch or c.batch_size
    c.grpo.num_generations = FLAGS.num_generations or c.grpo.num_generations
    if FLAGS.temperature is not None:
        c.grpo.temperature = FLAGS.temperature
    if FLAGS.grpo_lr is not None:
        c.optimizer.learning_rate = FLAGS.grpo_lr
    c.total_steps = FLAGS.grpo_steps or c.total_steps
    sft, grpo, rows, t_grpo = tp.aligned_stage("grpo", c, wd, sft_path)
    k = max(1, min(10, len(rows) // 5))
    train_stats = {"reward_first_steps": tp.mean(rows[:k], "reward"), "reward_last_steps": tp.mean(rows[-k:], "reward"),
                   "kl_last_steps": tp.mean(rows[-k:], "kl"), "entropy_last_steps": tp.mean(rows[-k:], "entropy"),
                   "window": k, "grpo_seconds": t_grpo}
    md = tp.table(sft, grpo, name="GRPO")
    md += (f"\n\nGRPO training ({len(rows)} steps, {c.batch_size} prompts x {c.grpo.num_generations} samples): "
           f"sample reward {train_stats['reward_first_steps']:.3f} (first {k} steps) -> "
           f"{train_stats['reward_last_steps']:.3f} (last {k}); KL to the SFT reference "
           f"{train_stats['kl_last_steps']:.4f} per token (k3, mean of the last {k} steps).")
    tp.plot_curves(rows, [("reward", "GRPO: mean reward of the samples"),
                          ("kl", "KL(policy || SFT reference), k3, per token")], os.path.join(wd, "grpo_reward.png"))
    tp.report(wd, "results_grpo", "GRPO", sft, grpo, md, t0, "grpo_reward.png", train_stats)

if __name__ == "__main__":
    tp.run_main(main)

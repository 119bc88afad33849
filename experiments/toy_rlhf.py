"""The RLHF pipeline of InstructGPT on the embedded toy task: SFT -> reward model -> PPO, ending with the per-axis
table SFT vs PPO, the reward model's held-out accuracy and the KL to the reference.

    python experiments/toy_rlhf.py --workdir=/tmp/align_jax_toy

1. SFT: the SFT stage of experiments/toy_pipeline.py (an existing <workdir>/sft/export is reused).
2. Reward model (configs/reward_model.py) from the SFT export on the toy task's soft-label preference pairs
   (Bradley-Terry, scalar head at the last token); its accuracy on held-out pairs is reported.
3. PPO (configs/ppo.py) from the SFT export: value model initialised from the reward model, frozen reference =
   the SFT model, rollouts on the toy prompt-only set scored by the reward model (never by the gold reward).
4. Both policies answer the held-out prompts greedily and are scored per axis by the toy task's programs.
Writes <workdir>/results_ppo.json, results_ppo.md and ppo_training.png (reward-model score and KL per step).
Each stage resumes from its own checkpoints if interrupted; a finished stage is skipped.
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_pipeline as tp  # noqa: E402  (its flags: --workdir, --sft_steps, --eval_prompts, ...)

# 0 / None keep the configs' values.
flags.DEFINE_integer("rm_steps", 120, "Reward-model steps (0 = configs/reward_model.py's default).")
flags.DEFINE_integer("ppo_steps", 0, "PPO optimizer steps (rollouts x num_ppo_epochs x num_mini_batches).")
flags.DEFINE_float("ppo_lr", None, "PPO learning rate (constant).")
flags.DEFINE_float("kl_coef", None, "Per-token KL penalty coefficient.")
flags.DEFINE_string("value_model", "", "reward_model | policy | shared.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    wd, t0, sft_path = tp.start()

    rm = tp._config("reward_model", wd)
    rm.model.init_from = sft_path
    rm.total_steps = FLAGS.rm_steps or rm.total_steps
    rm.eval_every = 0
    rm.checkpoint.every_steps = rm.total_steps
    rm_wd = os.path.join(wd, "reward_model")
    rm_path = tp._stage("reward_model", rm, rm_wd)

    c = tp._config("ppo", wd)
    c.ppo.reward_model = rm_path
    if FLAGS.value_model:
        c.ppo.value_model = FLAGS.value_model
    if FLAGS.ppo_lr is not None:
        c.optimizer.learning_rate = FLAGS.ppo_lr
    if FLAGS.kl_coef is not None:
        c.ppo.kl_coef = FLAGS.kl_coef
    c.total_steps = FLAGS.ppo_steps or c.total_steps
    sft, ppo, rows, t_ppo = tp.aligned_stage("ppo", c, wd, sft_path)
    _, rm_evals = tp.read_metrics(os.path.join(rm_wd, "metrics.jsonl"))
    K = c.ppo.num_ppo_epochs * c.ppo.num_mini_batches
    k = max(K, min(10 * K, len(rows) // 5 // K * K))  # whole rollouts
    train_stats = {"score_first_steps": tp.mean(rows[:k], "objective/scores"),
                   "score_last_steps": tp.mean(rows[-k:], "objective/scores"),
                   "kl_last_steps": tp.mean(rows[-k:], "objective/kl"),
                   "kl_per_token_last_steps": tp.mean(rows[-k:], "objective/kl") / max(
                       tp.mean(rows[-k:], "completions/mean_length"), 1e-9),
                   "reward_model_eval_accuracy": rm_evals[-1].get("eval/accuracy") if rm_evals else None,
                   "window_steps": k, "ppo_seconds": t_ppo}
    md = tp.table(sft, ppo, name="PPO")
    acc = train_stats["reward_model_eval_accuracy"]
    md += (f"\n\nReward model: held-out pair accuracy {acc:.3f}." if acc is not None else "")
    md += (f"\nPPO training ({len(rows)} steps, {c.batch_size} prompts per rollout, {K} updates per rollout): "
           f"reward-model score {train_stats['score_first_steps']:.3f} (first {k} steps) -> "
           f"{train_stats['score_last_steps']:.3f} (last {k}); KL to the SFT reference "
           f"{train_stats['kl_last_steps']:.3f} per completion = {train_stats['kl_per_token_last_steps']:.4f} per "
           f"token (k1, mean of the last {k} steps).")
    tp.plot_curves(rows, [("objective/scores", "reward-model score of the samples"),
                          ("objective/kl", "KL(policy || SFT) per completion (k1 sum)"),
                          ("loss/value_avg", "value loss")], os.path.join(wd, "ppo_training.png"))
    tp.report(wd, "results_ppo", "PPO", sft, ppo, md, t0, "ppo_training.png", train_stats)


if __name__ == "__main__":
    tp.run_main(main)

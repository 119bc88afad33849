"""Orbax checkpoints of the train state and the Grain iterator, saved asynchronously every N steps (and at the
end and on SIGTERM), keeping the last K; `restore_latest` resumes a restarted run exactly where it stopped."""

from __future__ import annotations

import logging

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, cfg):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(
            directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})
        self._last_saved = self.manager.latest_step()

    def save(self, step: int, state, data_iter, *, force: bool = False) -> None:
        if self._last_saved == step:
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=grain.checkpoint.CheckpointSave(data_iter)),
                          force=force)
        self._last_saved = step

    def restore_latest(self, state, data_iter):
        """(state, step) from the latest checkpoint, restored straight into `state`'s shardings, with the data
        iterator moved to where it was; None when there is no checkpoint."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iter)))
        log.info("restored checkpoint %d from %s", step, self.directory)
        return restored["state"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

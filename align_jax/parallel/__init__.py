"""Device mesh and sharding rules."""
from align_jax.parallel.mesh import (BATCH, MESH_AXES, RULES, MeshError, batch_sharding, create_sharded,
                                     logical_to_spec, make_mesh, mesh_from_config, mesh_shape, param_shardings,
                                     param_specs, replicated)
from align_jax.parallel.batch import (activation_sharding, batch_specs, constrain_batch, host_batch,
                                      same_shapes_across_processes, to_device)

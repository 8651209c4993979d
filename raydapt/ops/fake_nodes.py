"""Ray's fake multi-node provider, with one change: every worker node gets its own temp dir
(and so its own session dir: runtime_resources, sockets, logs), as a separate machine has.

Why: Ray 2.60's provider starts each worker node with the head's temp dir, so all nodes share
one ``runtime_resources`` directory. A job's ``working_dir`` is unpacked there per node with
``overwrite=True`` (``ray._private.runtime_env.working_dir.WorkingDirPlugin.create``): the first
task of the job on a new node deletes and re-unpacks the directory the driver on the head is
running in, and the driver dies with ``FileNotFoundError`` from ``os.getcwd()``. With a temp
dir per node, each node unpacks its own copy, as on a real cluster.

The node dirs live under the cluster's temp dir (``<temp_dir>/nodes/<node id tail>``), so
:func:`raydapt.ops.local_cluster.cluster_processes` still finds every process by that prefix.
The autoscaler imports this class (``provider: {type: external, module: ...}``).
"""

from __future__ import annotations

import copy
import json
import os

import ray
import ray._private.ray_constants as ray_constants
from ray._common.network_utils import build_address
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

MODULE = "raydapt.ops.fake_nodes.SeparateDirsFakeProvider"


class SeparateDirsFakeProvider(FakeMultiNodeProvider):
    """:class:`FakeMultiNodeProvider` whose worker nodes each have their own temp dir
    (``provider.nodes_dir`` in the autoscaler config)."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources,
                                               labels):
        # Ray 2.60.0's method, plus temp_dir=<nodes_dir>/<id tail>
        resources = copy.deepcopy(resources)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            next_id = self._next_hex_node_id()
            temp_dir = os.path.join(self.provider_config["nodes_dir"], next_id[-5:])
            os.makedirs(temp_dir, exist_ok=True)
            gcs = self._gcs_address or build_address(
                ray._private.services.get_node_ip_address(), 6379)
            ray_params = ray._private.parameter.RayParams(
                min_worker_port=0,
                max_worker_port=0,
                dashboard_port=None,
                dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0),
                num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources,
                labels=labels,
                redis_address=gcs,
                gcs_address=gcs,
                temp_dir=temp_dir,
                env_vars={
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id,
                    "RAY_CLOUD_INSTANCE_ID": next_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                },
            )
            node = ray._private.node.Node(
                ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False
            )
            all_tags = {
                TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
                TAG_RAY_USER_NODE_TYPE: node_type,
                TAG_RAY_NODE_NAME: next_id,
                TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
            }
            all_tags.update(tags)
            self._nodes[next_id] = {"tags": all_tags, "node": node}

    def non_terminated_nodes(self, tag_filters):
        """Ray's fake provider keeps reporting a node whose raylet died (it only forgets nodes
        it terminated itself), so the autoscaler counted a lost node against its type's
        ``max_workers`` and never replaced it. A cloud reports a lost machine as gone: here a
        worker node whose raylet process has exited is stopped (its other processes) and
        dropped."""
        from ray._private import ray_constants as rc

        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                node = entry.get("node")
                if node is None or not hasattr(node, "all_processes"):
                    continue  # the head (no Node object here)
                raylets = node.all_processes.get(rc.PROCESS_TYPE_RAYLET, [])
                if raylets and all(p.process.poll() is not None for p in raylets):
                    self._nodes.pop(node_id)
                    try:
                        node.kill_all_processes(check_alive=False, allow_graceful=False)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
        return super().non_terminated_nodes(tag_filters)


# --------------------------------------------------------------------------------------------
# Patience on a loaded machine
# --------------------------------------------------------------------------------------------

#: Seconds a starting node may take to register with the GCS (Ray's own wait is a fixed 30 s,
#: which a 2-core machine under load misses: the raylet registers only after its Python
#: dashboard agent has started).
REGISTER_WAIT_S = float(os.environ.get("RAYDAPT_NODE_REGISTER_WAIT_S", "120"))


def patient_get_node() -> None:
    """Make ``ray._private.services.get_node`` (what ``Node.__init__`` polls, for at most 30 s,
    to see its raylet registered) itself wait up to :data:`REGISTER_WAIT_S` for the node."""
    import time

    import ray._private.services as services

    if getattr(services.get_node, "_raydapt_patient", False):
        return
    orig = services.get_node

    def get_node(gcs_address, node_id):
        t0 = time.monotonic()
        while True:
            try:
                return orig(gcs_address, node_id)
            except RuntimeError:
                if time.monotonic() - t0 > REGISTER_WAIT_S:
                    raise
                time.sleep(0.5)

    get_node._raydapt_patient = True
    services.get_node = get_node


patient_get_node()  # in the autoscaler's process, for the worker nodes it starts


def ray_cli() -> None:
    """``ray`` with :func:`patient_get_node` (``python -m raydapt.ops.fake_nodes start
    --head ...``), for the head."""
    import sys

    from ray.scripts.scripts import main

    sys.argv[0] = "ray"
    main()


if __name__ == "__main__":
    ray_cli()

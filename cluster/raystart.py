"""``python -m cluster.raystart start ...``: Ray's own ``ray start``, kept on loopback for a one-host cluster.

Ray resolves 127.0.0.1 to the machine's network address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and
with that variable set its CLI refuses to start a worker node. A local test cluster must stay on loopback
(nothing else should be able to reach it), so this entry point sets the variable for every process Ray
starts and lifts only the CLI's worker-node refusal. Everything else is ``ray start`` unchanged.
"""

from __future__ import annotations

import os
import sys
import types


def main() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants
    import ray.scripts.scripts as scripts

    # The CLI module alone sees multi-node clusters as enabled; address resolution in
    # ray._private.services keeps reading the real constants and stays on loopback.
    shim = types.ModuleType("ray_constants_for_cli")
    shim.__dict__.update(vars(ray_constants))
    shim.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = shim
    sys.argv[0] = "ray"
    scripts.main()


if __name__ == "__main__":
    main()

"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the environment.

JAX runs one process per host (or per GPU) that all execute the same program; they must join one
distributed runtime before anything touches devices. Three ways in, tried in this order:

1. explicit: ``--coordinator_address=host:port --num_processes=N --process_id=i`` (local runs,
   ``launch/local_multiprocess.sh``, clusters we do not detect); ``JAX_COORDINATOR_ADDRESS`` in
   the environment counts as explicit too;
2. detected: on a Cloud TPU VM, in a ``srun`` step of more than one task, under OpenMPI's
   ``mpirun`` with more than one rank, or in a GKE TPU / Kubernetes indexed Job, JAX's own
   auto-detection (``jax.distributed.initialize()`` without arguments) fills everything in;
3. nothing: a plain single-process run (a laptop, the tests) initialises nothing at all.

``--distributed=off`` skips all of it; ``--distributed=on`` insists (an undetectable environment
is then an error rather than a silent single-process run).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping, Sequence

import jax
from absl import flags, logging

MODES = ("auto", "on", "off")
GOOGLE_PCI_VENDOR = "0x1ae0"  # what a Cloud TPU VM's accelerators report in sysfs


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How to join (or not) the multi-process runtime; see the module docstring."""

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--distributed must be one of {MODES}, got {self.mode!r}")

    @property
    def explicit(self) -> bool:
        return any(
            v is not None for v in (self.coordinator_address, self.num_processes, self.process_id)
        )


def _int(environ: Mapping[str, str], key: str, default: int = 0) -> int:
    try:
        return int(environ.get(key, default))
    except ValueError:
        return default


def _on_cloud_tpu_vm(pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Google's PCI vendor id on an attached device marks a Cloud TPU VM (what JAX checks too)."""
    for path in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(path) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def detect_cluster(
    environ: Mapping[str, str] | None = None, pci_root: str = "/sys/bus/pci/devices"
) -> str | None:
    """The multi-process environment this process runs in, or None for a plain run.

    Only environments that JAX's ``jax.distributed.initialize()`` can bootstrap without
    arguments are named; single-task SLURM steps and single-rank MPI jobs count as plain runs.
    """
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "environment"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if all(k in environ for k in slurm) and _int(environ, "SLURM_NTASKS", 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return "openmpi"
    hostnames = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES")
    if hostnames and "," in hostnames:
        return "gke_tpu"
    if "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ:
        return "kubernetes"
    if _on_cloud_tpu_vm(pci_root):
        return "cloud_tpu"
    return None


def _use_gloo_for_cpu_collectives() -> None:
    """CPU devices in several processes talk through gloo; jax < 0.5 had no default for it. The
    setting only concerns the CPU backend, so it is harmless on TPU and GPU hosts."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError) as e:  # a jax without the option
        logging.info("leaving CPU collectives as they are: %s", e)


def _check_explicit(options: DistributedOptions) -> None:
    missing = [
        name
        for name, value in (
            ("--coordinator_address", options.coordinator_address),
            ("--num_processes", options.num_processes),
            ("--process_id", options.process_id),
        )
        if value is None
    ]
    if missing:
        raise ValueError(
            "an explicit multi-process run needs --coordinator_address=HOST:PORT, "
            f"--num_processes=N and --process_id=I together; missing {', '.join(missing)}"
        )
    if not 0 <= options.process_id < options.num_processes:
        raise ValueError(
            f"--process_id={options.process_id} must lie in [0, --num_processes="
            f"{options.num_processes})"
        )


def initialize(options: DistributedOptions, environ: Mapping[str, str] | None = None) -> bool:
    """Join the distributed runtime if ``options``/the environment ask for it; True if joined.

    Must run before anything touches devices (``jax.devices()``, any computation).
    """
    if options.mode == "off":
        if options.explicit:
            raise ValueError(
                "--distributed=off contradicts --coordinator_address/--num_processes/"
                "--process_id; drop one or the other"
            )
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs: dict = {"initialization_timeout": options.initialization_timeout}
    if options.local_device_ids is not None:
        kwargs["local_device_ids"] = list(options.local_device_ids)
    if options.explicit:
        _check_explicit(options)
        kwargs.update(
            coordinator_address=options.coordinator_address,
            num_processes=options.num_processes,
            process_id=options.process_id,
        )
        how = f"explicit coordinator {options.coordinator_address}"
    else:
        cluster = detect_cluster(environ)
        if cluster is None and options.mode == "auto":
            return False
        how = f"auto-detected ({cluster or 'forced by --distributed=on'})"
    _use_gloo_for_cpu_collectives()
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({how}): {e}. For a run on one host without a "
            "cluster, pass --distributed=off; for a local multi-process run give "
            "--coordinator_address, --num_processes and --process_id."
        ) from e
    logging.info(
        "joined the distributed runtime, %s: process %d of %d, %d local / %d global devices",
        how,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# --------------------------------------------------------------------------------------- flags
def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags read by ``options_from_flags``; call it from a binary's define_flags."""
    flags.DEFINE_enum(
        "distributed",
        "auto",
        list(MODES),
        "auto: join a multi-process runtime when flags or a detected cluster (Cloud TPU, SLURM, "
        "OpenMPI, GKE/Kubernetes) call for one; on: always (error if nothing is detected); off: "
        "never.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0's coordinator, for runs JAX cannot detect (e.g. localhost).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "Processes in the run (with --coordinator_address).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "process_id",
        None,
        "This process's index, 0-based (with --coordinator_address).",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "local_device_ids",
        None,
        "GPUs this process uses, e.g. 0,1,2,3 (default: JAX's choice; under SLURM that is one "
        "GPU per task, so one-process-per-node runs list all the node's GPUs).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "distributed_timeout",
        300,
        "Seconds to wait for every process to join.",
        flag_values=flag_values,
    )


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> DistributedOptions:
    ids: Sequence[str] | None = flag_values.local_device_ids
    return DistributedOptions(
        mode=flag_values.distributed,
        coordinator_address=flag_values.coordinator_address,
        num_processes=flag_values.num_processes,
        process_id=flag_values.process_id,
        local_device_ids=None if ids is None else tuple(int(i) for i in ids),
        initialization_timeout=flag_values.distributed_timeout,
    )

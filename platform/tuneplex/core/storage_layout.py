"""Where everything lives in artifact storage: the bucket's layout in one place.

    orgs/<organization>/files/<file>.jsonl                         an uploaded dataset
    orgs/<organization>/uploads/<upload>/<part>.part               a part of an upload in parts
    orgs/<organization>/uploads/<upload>/assembly-<attempt>.partial  its file being assembled
    orgs/<organization>/adapters/<adapter>/                        a trained adapter's files
    orgs/<organization>/adapters/<adapter>/merged/                 its merged model
    orgs/<organization>/jobs/<job>/checkpoints/step-<n>-a<attempt>/  a job's checkpoint
    orgs/<organization>/jobs/<job>/tensorboard/                    a job's TensorBoard event files
    orgs/<organization>/jobs/<job>/wandb/<run directory>/          its W&B run files, per attempt
    orgs/<organization>/evals/runs/<run>/items.jsonl               an eval run's items
    orgs/<organization>/batches/<batch>/requests-a<attempt>.jsonl  a batch's checked requests
    orgs/<organization>/exports/<export>/<artifact>                an adapter's export

Everything of an organization is under its own prefix; the names are generated ids, so no text
a tenant chose reaches a path. The functions take ids, not rows, so that every app may use them
(``tuneplex.core`` imports no app above it).
"""

from __future__ import annotations


def file_blob_name(organization_id: str, file_id: str) -> str:
    return f"orgs/{organization_id}/files/{file_id}.jsonl"


def upload_prefix(organization_id: str, upload_id: str) -> str:
    """An upload's parts while it is pending (deleted once it is completed, cancelled or
    expired), and, on local storage, the file being assembled from them."""
    return f"orgs/{organization_id}/uploads/{upload_id}"


def upload_part_blob_name(organization_id: str, upload_id: str, part_id: str) -> str:
    return f"{upload_prefix(organization_id, upload_id)}/{part_id}.part"


def upload_assembly_scratch(organization_id: str, upload_id: str, attempt: int) -> str:
    """Where local storage writes the assembled file before renaming it to its file's name."""
    return f"{upload_prefix(organization_id, upload_id)}/assembly-{attempt}.partial"


def adapter_prefix(organization_id: str, adapter_id: str) -> str:
    return f"orgs/{organization_id}/adapters/{adapter_id}"


def merged_prefix(adapter_prefix: str) -> str:
    """The merged model of the adapter stored under ``adapter_prefix``."""
    return f"{adapter_prefix}/merged"


def checkpoint_prefix(organization_id: str, job_id: str, *, attempt: int, step: int) -> str:
    """The attempt is part of the name, so a superseded worker can never overwrite the files of
    the attempt that replaced it."""
    return f"orgs/{organization_id}/jobs/{job_id}/checkpoints/step-{step}-a{attempt}"


def tensorboard_prefix(organization_id: str, job_id: str) -> str:
    """One event file per attempt under it."""
    return f"orgs/{organization_id}/jobs/{job_id}/tensorboard"


def wandb_prefix(organization_id: str, job_id: str) -> str:
    """One W&B run directory per attempt under it (``offline-run-<time>-<job>``: its .wandb file
    and its files/), as ``wandb sync`` takes them."""
    return f"orgs/{organization_id}/jobs/{job_id}/wandb"


def eval_run_items_blob(organization_id: str, run_id: str) -> str:
    """The items an eval run answers and grades, one JSON object a line, copied there when the
    run is created (from the request or from an uploaded file)."""
    return f"orgs/{organization_id}/evals/runs/{run_id}/items.jsonl"


def batch_requests_blob(organization_id: str, batch_id: str, attempt: int) -> str:
    """A batch's requests, one {line, custom_id, body} a line, written by the attempt that
    checked them (its number in the name: a superseded worker never overwrites the blob)."""
    return f"orgs/{organization_id}/batches/{batch_id}/requests-a{attempt}.jsonl"


def export_prefix(organization_id: str, export_id: str) -> str:
    """An export's folder: its artifact (named by the export, from ids only) and, on local
    storage, the artifact being written (``export_scratch``)."""
    return f"orgs/{organization_id}/exports/{export_id}"


def export_scratch(organization_id: str, export_id: str) -> str:
    return f"{export_prefix(organization_id, export_id)}/artifact.partial"

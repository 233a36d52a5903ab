"""What the fine-tuning app announces to the apps above it, which it must not import.

``adapter_trained`` is sent once a job's adapter is stored and the job marked succeeded (after
the commit, in the process that finished the job: the GPU worker), with ``adapter_id``. The
evals app answers it (tuneplex.evals.gates.after_training): the adapter is deployed, gated by
an eval first, or left as the organization's settings say.
"""

from django.dispatch import Signal

adapter_trained = Signal()

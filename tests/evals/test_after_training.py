"""What happens to a job's adapter once the job succeeded (tuneplex.evals.gates.after_training),
where no engine is needed to tell: a sweep's trial is left to its sweep."""

from __future__ import annotations

import pytest

from tests.fixtures.adapter_rows import adapter_row
from tuneplex.adapters.models import Adapter
from tuneplex.evals.gates import after_training
from tuneplex.finetuning.models import FineTuningJob, JobEvent

pytestmark = pytest.mark.django_db


def test_a_sweeps_trial_is_not_deployed_and_an_ordinary_adapter_goes_the_usual_way(org_a,
                                                                                  default_model):
    trial = adapter_row(org_a.organization, default_model)
    FineTuningJob.objects.filter(pk=trial.job_id).update(
        metadata={"sweep_id": "sweep_x", "sweep_trial": "0"})
    assert after_training(trial.id) == "sweep trial"
    assert not Adapter.objects.get(pk=trial.pk).deployed
    said = list(JobEvent.objects.filter(job_id=trial.job_id).values_list("message", flat=True))
    assert said == ["Adapter not deployed: it is a trial of sweep sweep_x, which deploys its best "
                    "trial if it was created with deploy_best."]
    # The positive control: an adapter of no sweep takes the ungated path (here no replica
    # serves the base model, which its job's events say).
    ordinary = adapter_row(org_a.organization, default_model)
    assert after_training(ordinary.id) == "not deployed"
    assert JobEvent.objects.get(job_id=ordinary.job_id).message.startswith(
        "Adapter not deployed automatically: no engine replica serves")

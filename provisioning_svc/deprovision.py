"""Deprovisioning a tenant (README, "Deprovisioning"): complete, safe and resumable.

A real run works on the tenant's one open job in `deprovision_jobs`:

1. MARK_TENANT       `deprovision_claim` marks the tenant 'deprovisioning' and
                     captures its SendGrid subuser name (with the job's lease)
2. SENDGRID_SUBUSER  DELETE /v3/subusers/<name> (204 and 404 mean gone)
3. TENANT_DATA       `deprovision_delete_batch` until nothing is left: committed
                     batches, children before parents, counts kept in the job
4. CONFIG_DIRECTORY  CLIENTS_DIR/<tenant_id>, removed without following symlinks
5. TENANT_RECORD     `deprovision_finish` deletes the tenant row, completes the job

Each step is recorded as it finishes and skipped when a later call resumes the
job. The call holding the job's lease (until its deadline) is the only one
that may change it; a second concurrent call gets ABORTED. Every step checks
the remaining budget before it starts; some of the deadline is kept back so
that a failure can still be recorded (and the lease released) in time. A call
that is cancelled (its caller cancelled or went away) records that in a
short, shielded call, so its lease does not outlive it and a retry can start
at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from provisioning_svc.config_directories import ConfigDirectories, DirectoryState
from provisioning_svc.sendgrid_subusers import (
    SendGridSubusers,
    SubuserDeletion,
    subuser_path_segment,
)
from shared.auth import Caller
from shared.database import Database
from shared.deadline import Deadline
from shared.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from shared.logs import kv
from shared.metrics import DEPROVISION_JOBS
from shared.status import internal_error
from shared.tenants import parse_tenant_id

log = logging.getLogger(__name__)

# Caps of single database calls (each is one transaction).
CLAIM_CAP_S = 5.0
RECORD_CAP_S = 5.0
BATCH_CAP_S = 10.0
FINISH_CAP_S = 10.0
PLAN_CAP_S = 30.0
# Part of the deadline kept back for recording a failure (and releasing the
# lease): a share of it, within these bounds. The floor covers a database call
# that overruns its budget by the transport's client grace, plus the record.
RESERVE_SHARE = 0.1
RESERVE_MIN_S = 0.1
RESERVE_MAX_S = 0.3
# A cancelled call records the cancellation (releasing the lease) within this long.
CANCELLED_RECORD_S = 1.0
# Least budget worth starting a step with.
STEP_MIN_S = {
    "SENDGRID_SUBUSER": 0.2,
    "TENANT_DATA": 0.03,
    "CONFIG_DIRECTORY": 0.03,
    "TENANT_RECORD": 0.03,
}
# Row batches: sized from the measured rate to take about this long, and
# never more than a quarter of the time left.
BATCH_TARGET_S = 0.5
BATCH_SHARE_OF_REMAINING = 0.25
MIN_BATCH_ROWS = 100
# A batch starts only with this multiple of the last batch's duration left.
BATCH_MARGIN = 1.5
FIRST_BATCH_ROWS = 1000
DEFAULT_MAX_BATCH_ROWS = 100_000


class Step(enum.StrEnum):
    MARK_TENANT = "MARK_TENANT"
    SENDGRID_SUBUSER = "SENDGRID_SUBUSER"
    TENANT_DATA = "TENANT_DATA"
    CONFIG_DIRECTORY = "CONFIG_DIRECTORY"
    TENANT_RECORD = "TENANT_RECORD"


class Outcome(enum.StrEnum):
    DONE = "DONE"
    ALREADY_ABSENT = "ALREADY_ABSENT"
    SKIPPED = "SKIPPED"
    WOULD_DELETE = "WOULD_DELETE"
    FAILED = "FAILED"
    PENDING = "PENDING"


FINISHED = frozenset({Outcome.DONE, Outcome.ALREADY_ABSENT, Outcome.SKIPPED})


class JobState(enum.StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    VALIDATED = "VALIDATED"


@dataclass(frozen=True)
class DeprovisionRequest:
    tenant_id: str
    request_id: str = ""
    validate_only: bool = False
    allow_missing: bool = False


@dataclass(frozen=True)
class StepResult:
    step: Step
    outcome: Outcome
    detail: str = ""
    # The tenant's own data, and our rows derived from it: table -> rows.
    rows: Mapping[str, int] = field(default_factory=dict)
    derived_rows: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DeprovisionResult:
    tenant_id: str
    job_id: str
    state: JobState
    validate_only: bool
    steps: tuple[StepResult, ...]
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class Job:
    """A row of deprovision_jobs, as `deprovision_job_document` returns it."""

    id: str
    tenant_id: str
    state: JobState
    sendgrid_username: str | None
    steps: Mapping[Step, StepResult]
    started_at: datetime
    finished_at: datetime | None

    @classmethod
    def parse(cls, document: Any) -> Job:
        try:
            steps = {
                Step(name): StepResult(
                    step=Step(name),
                    outcome=Outcome(entry["outcome"]),
                    detail=str(entry.get("detail") or ""),
                    rows=_counts(entry.get("rows")),
                    derived_rows=_counts(entry.get("derived_rows")),
                )
                for name, entry in document["steps"].items()
            }
            finished = document.get("finished_at")
            return cls(
                id=str(document["id"]),
                tenant_id=str(document["tenant_id"]),
                state=JobState(document["state"]),
                sendgrid_username=document.get("sendgrid_username"),
                steps=steps,
                started_at=datetime.fromisoformat(document["started_at"]),
                finished_at=datetime.fromisoformat(finished) if finished else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Internal(
                f"malformed deprovision job document: {exc!r}", reason="BAD_DB_RESULT"
            ) from None

    def finished(self, step: Step) -> bool:
        entry = self.steps.get(step)
        return entry is not None and entry.outcome in FINISHED

    def failed_at(self, step: Step, detail: str) -> Job:
        """This job with `step` failed, for when the database could not record it."""
        before = self.steps.get(step, StepResult(step, Outcome.FAILED))
        steps = {**self.steps, step: replace(before, outcome=Outcome.FAILED, detail=detail)}
        return replace(self, state=JobState.FAILED, steps=steps)

    def result(self) -> DeprovisionResult:
        return DeprovisionResult(
            tenant_id=self.tenant_id,
            job_id=self.id,
            state=self.state,
            validate_only=False,
            steps=tuple(
                self.steps.get(step, StepResult(step, Outcome.PENDING, "not started"))
                for step in Step
            ),
            started_at=self.started_at,
            finished_at=self.finished_at,
        )


def _counts(value: Any) -> dict[str, int]:
    """A {table: rows} map of a job document (absent: empty)."""
    return {str(k): int(v) for k, v in (value or {}).items()}


def parse_request_id(value: str) -> uuid.UUID:
    """The idempotency key: a UUID in canonical form; empty means a fresh one."""
    if value == "":
        return uuid.uuid4()
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != value.lower():
        raise InvalidArgument(
            "request_id must be a UUID such as 3f1c2a9e-7b4d-4c1e-9a53-2b8f0d6e4a71",
            field="request_id",
            reason="INVALID_REQUEST_ID",
        )
    return parsed


def _failure_detail(error: ServiceError) -> str:
    if isinstance(error, Internal):
        return f"{error.reason}: internal error (details in the service log)"
    return f"{error.reason}: {error.message}"


# A step: the job, the lease owner (this call), the work deadline -> the updated job.
StepRunner = Callable[[Job, str, Deadline], Awaitable[Job]]


class Deprovisioner:
    def __init__(
        self,
        db: Database,
        subusers: SendGridSubusers,
        directories: ConfigDirectories,
        *,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    ) -> None:
        self._db = db
        self._subusers = subusers
        self._directories = directories
        self._max_batch_rows = max(max_batch_rows, 1)

    async def deprovision(
        self, request: DeprovisionRequest, caller: Caller, deadline: Deadline
    ) -> DeprovisionResult:
        """Deprovision for `caller`, whose scope the server boundary checked."""
        try:
            result = await self._deprovision(request, caller, deadline)
        except ServiceError as error:
            for partial in error.details:
                if isinstance(partial, DeprovisionResult):
                    DEPROVISION_JOBS.labels(partial.state.value).inc()
            raise
        DEPROVISION_JOBS.labels(result.state.value).inc()
        return result

    async def _deprovision(
        self, request: DeprovisionRequest, caller: Caller, deadline: Deadline
    ) -> DeprovisionResult:
        tenant_id = parse_tenant_id(request.tenant_id)
        request_id = parse_request_id(request.request_id)
        caller.require_tenant(tenant_id)
        # Configuration problems fail before anything is touched.
        self._subusers.require_usable()
        if request.validate_only:
            return await self._dry_run(tenant_id, request.allow_missing, deadline)
        # An unsafe directory is refused now rather than after the data is gone.
        await self._directories.inspect(tenant_id, deadline)
        owner = str(uuid.uuid4())  # this call, as the lease owner
        claim = await self._db.call(
            "deprovision_claim",
            {
                "p_tenant_id": tenant_id,
                "p_request_id": str(request_id),
                "p_actor": caller.name,
                "p_lease_owner": owner,
                "p_lease_seconds": deadline.remaining(),
            },
            deadline,
            cap_s=CLAIM_CAP_S,
            tenant_id=tenant_id,
        )
        disposition = claim.get("disposition") if isinstance(claim, dict) else None
        if disposition == "request_id_reused":
            raise InvalidArgument(
                "request_id was already used for another tenant; send a new one",
                field="request_id",
                reason="REQUEST_ID_REUSED",
            )
        if disposition == "missing":
            return _missing(tenant_id, request.allow_missing, validate_only=False)
        if disposition not in {"recorded", "claimed"}:
            raise Internal(f"unexpected claim disposition {disposition!r}", reason="BAD_DB_RESULT")
        job = Job.parse(claim["job"])
        if disposition == "recorded":
            await self._lower_write_guard(deadline)  # in case the first completion could not
            return job.result()
        log.info(
            kv(
                "deprovision_claimed",
                tenant_id=tenant_id,
                job_id=job.id,
                request_id=request_id,
                actor=caller.name,
            )
        )
        return await self._resume(job, owner, deadline)

    def _steps(self) -> tuple[tuple[Step, StepRunner], ...]:
        return (
            (Step.SENDGRID_SUBUSER, self._delete_subuser),
            (Step.TENANT_DATA, self._delete_rows),
            (Step.CONFIG_DIRECTORY, self._remove_directory),
            (Step.TENANT_RECORD, self._finish),
        )

    async def _resume(self, job: Job, owner: str, deadline: Deadline) -> DeprovisionResult:
        reserve = min(max(deadline.remaining() * RESERVE_SHARE, RESERVE_MIN_S), RESERVE_MAX_S)
        work = Deadline(deadline.expires_at - reserve)
        step = Step.SENDGRID_SUBUSER
        try:
            for step, run in self._steps():
                if not job.finished(step):
                    job = await run(job, owner, work)
        except ServiceError as error:
            job = await self._record_failure(
                job, owner, step, error.reason, _failure_detail(error), deadline
            )
            if job.state is JobState.COMPLETED:
                # The last call timed out on our side but committed on the database's
                # (PostgREST does not cancel abandoned queries): the tenant is gone.
                log.info(kv("deprovision_completed", tenant_id=job.tenant_id, job_id=job.id))
                await self._lower_write_guard(deadline)
                return job.result()
            error.metadata.setdefault("tenant_id", job.tenant_id)
            error.metadata["job_id"] = job.id
            error.metadata["step"] = step.value
            error.details.append(job.result())
            raise
        except asyncio.CancelledError:
            await self._record_cancellation(job, owner, step)
            raise
        except Exception as exc:
            error = internal_error(exc)
            await self._record_failure(
                job, owner, step, error.reason, _failure_detail(error), deadline
            )
            raise
        log.info(kv("deprovision_completed", tenant_id=job.tenant_id, job_id=job.id))
        await self._lower_write_guard(deadline)
        return job.result()

    async def _lower_write_guard(self, deadline: Deadline) -> None:
        """Lower the write guard's flag if no tenant is left deprovisioning
        (docs/design.md, "Closed to writers"). A flag left up makes every write
        take the guard's full check until a later completion lowers it; it never
        costs safety, so a failure here is logged and the completed job still
        answers."""
        try:
            await self._db.call("tenant_write_guard_lower", {}, deadline, cap_s=RECORD_CAP_S)
        except ServiceError as error:
            log.warning(kv("write_guard_flag_not_lowered", reason=error.reason))

    async def _record_cancellation(self, job: Job, owner: str, step: Step) -> None:
        """Record that this call was cancelled at `step`, releasing its lease.

        The call's own deadline no longer matters: the record gets a short
        budget of its own, and this waits for it no longer than that.
        """
        try:
            async with asyncio.timeout(CANCELLED_RECORD_S):
                await self._record_failure(
                    job,
                    owner,
                    step,
                    "CANCELLED",
                    "CANCELLED: the call was cancelled before this step finished",
                    Deadline.after(CANCELLED_RECORD_S),
                )
        except (TimeoutError, asyncio.CancelledError):
            # Cancelled again, or too slow: the record goes on in the background
            # within its budget, and the lease expires at the deadline at the latest.
            log.warning(kv("deprovision_cancellation_not_recorded", job_id=job.id))

    async def _record_failure(
        self, job: Job, owner: str, step: Step, reason: str, detail: str, deadline: Deadline
    ) -> Job:
        """Mark `step` and the job FAILED and release the lease (`deprovision_fail`).

        Shielded: cancelling the call that awaits it (the caller went away
        meanwhile) must not cancel the record, which is bounded by `deadline`.
        """
        log.warning(
            kv(
                "deprovision_step_failed",
                tenant_id=job.tenant_id,
                job_id=job.id,
                step=step.value,
                reason=reason,
            )
        )
        recording = asyncio.ensure_future(
            self._call_deprovision_fail(job, owner, step, reason, detail, deadline)
        )
        return await asyncio.shield(recording)

    async def _call_deprovision_fail(
        self, job: Job, owner: str, step: Step, reason: str, detail: str, deadline: Deadline
    ) -> Job:
        try:
            document = await self._db.call(
                "deprovision_fail",
                {
                    "p_job_id": job.id,
                    "p_lease_owner": owner,
                    "p_step": step.value,
                    "p_reason": reason,
                    "p_detail": detail,
                },
                deadline,
                cap_s=RECORD_CAP_S,
                tenant_id=job.tenant_id,
            )
            return Job.parse(document)
        except ServiceError as second:
            # The lease expires at the deadline anyway; the answer still says what failed.
            log.warning(kv("deprovision_failure_not_recorded", job_id=job.id, reason=second.reason))
            return job.failed_at(step, detail)

    @staticmethod
    def _require(work: Deadline, step: Step, expected_s: float = 0.0) -> None:
        """Refuse to start `step` (or a batch expected to take `expected_s`) without the time."""
        left = work.remaining()
        if left < max(STEP_MIN_S[step.value], expected_s):
            raise DeadlineExceeded(
                f"{max(left, 0):.3f}s left: not enough to start step {step.value}",
                reason="BUDGET_EXHAUSTED",
                metadata={"operation": f"deprovision.{step.value.lower()}"},
            )

    async def _record(
        self, job: Job, owner: str, step: Step, outcome: Outcome, detail: str, work: Deadline
    ) -> Job:
        document = await self._db.call(
            "deprovision_record_step",
            {
                "p_job_id": job.id,
                "p_lease_owner": owner,
                "p_step": step.value,
                "p_outcome": outcome.value,
                "p_detail": detail,
            },
            work,
            cap_s=RECORD_CAP_S,
            tenant_id=job.tenant_id,
        )
        return Job.parse(document)

    async def _delete_subuser(self, job: Job, owner: str, work: Deadline) -> Job:
        step = Step.SENDGRID_SUBUSER
        self._require(work, step)
        name = job.sendgrid_username
        if name is None:
            outcome, detail = Outcome.ALREADY_ABSENT, "the tenant has no SendGrid subuser"
        elif not self._subusers.has_key:
            outcome = Outcome.SKIPPED
            detail = f"SENDGRID_API_KEY is not set (dev mode): subuser {name} was not deleted"
        elif await self._subusers.delete(name, work, tenant_id=job.tenant_id) is (
            SubuserDeletion.DELETED
        ):
            outcome, detail = Outcome.DONE, f"SendGrid subuser {name} deleted"
        else:
            outcome, detail = Outcome.ALREADY_ABSENT, f"SendGrid subuser {name} did not exist"
        return await self._record(job, owner, step, outcome, detail, work)

    async def _delete_rows(self, job: Job, owner: str, work: Deadline) -> Job:
        batch_rows = min(FIRST_BATCH_ROWS, self._max_batch_rows)
        expected_s = 0.0
        while True:
            # A batch cut by the deadline is rolled back: wasted work, so don't start one
            # with less time than the last one took (its fixed cost does not shrink).
            self._require(work, Step.TENANT_DATA, expected_s * BATCH_MARGIN)
            started = time.monotonic()
            reply = await self._db.call(
                "deprovision_delete_batch",
                {"p_job_id": job.id, "p_lease_owner": owner, "p_batch_rows": batch_rows},
                work,
                cap_s=BATCH_CAP_S,
                tenant_id=job.tenant_id,
            )
            job = Job.parse(reply["job"])
            if reply["done"]:
                return job
            deleted = sum(int(n) for n in reply["deleted"].values())
            expected_s = time.monotonic() - started
            batch_rows = self._next_batch_rows(deleted, expected_s, work)

    def _next_batch_rows(self, deleted: int, elapsed_s: float, work: Deadline) -> int:
        rate = deleted / max(elapsed_s, 0.001)
        target_s = min(BATCH_TARGET_S, work.remaining() * BATCH_SHARE_OF_REMAINING)
        return int(min(max(rate * target_s, MIN_BATCH_ROWS), self._max_batch_rows))

    async def _remove_directory(self, job: Job, owner: str, work: Deadline) -> Job:
        step = Step.CONFIG_DIRECTORY
        self._require(work, step)
        before = await self._directories.remove(job.tenant_id, job.id, work)
        path = f"CLIENTS_DIR/{job.tenant_id}"
        if before is DirectoryState.PRESENT:
            outcome, detail = Outcome.DONE, f"{path} removed"
        else:
            outcome, detail = Outcome.ALREADY_ABSENT, f"{path} did not exist"
        return await self._record(job, owner, step, outcome, detail, work)

    async def _finish(self, job: Job, owner: str, work: Deadline) -> Job:
        self._require(work, Step.TENANT_RECORD)
        document = await self._db.call(
            "deprovision_finish",
            {"p_job_id": job.id, "p_lease_owner": owner},
            work,
            cap_s=FINISH_CAP_S,
            tenant_id=job.tenant_id,
        )
        return Job.parse(document)

    async def _dry_run(
        self, tenant_id: str, allow_missing: bool, deadline: Deadline
    ) -> DeprovisionResult:
        directory = await self._directories.inspect(tenant_id, deadline)
        plan = await self._db.call(
            "deprovision_plan",
            {"p_tenant_id": tenant_id},
            deadline,
            cap_s=PLAN_CAP_S,
            tenant_id=tenant_id,
        )
        if not plan["tenant_exists"]:
            if plan.get("completed_job"):
                return Job.parse(plan["completed_job"]).result()
            return _missing(tenant_id, allow_missing, validate_only=True)
        open_job = Job.parse(plan["open_job"]) if plan.get("open_job") else None
        name: str | None = plan.get("sendgrid_username")
        rows = _counts(plan["rows"])
        derived_rows = _counts(plan["derived_rows"])

        if name is None:
            subuser = (Outcome.ALREADY_ABSENT, "the tenant has no SendGrid subuser")
        elif not self._subusers.has_key:
            subuser = (
                Outcome.SKIPPED,
                f"SENDGRID_API_KEY is not set (dev mode): subuser {name} would be left",
            )
        else:
            subuser_path_segment(name)  # a malformed name fails the dry run as it would the run
            subuser = (Outcome.WOULD_DELETE, f"would delete SendGrid subuser {name}")
        path = f"CLIENTS_DIR/{tenant_id}"
        planned = {
            Step.MARK_TENANT: StepResult(
                Step.MARK_TENANT,
                Outcome.WOULD_DELETE,
                "would mark the tenant deprovisioning (CRM reads then fail)",
            ),
            Step.SENDGRID_SUBUSER: StepResult(Step.SENDGRID_SUBUSER, *subuser),
            Step.TENANT_DATA: StepResult(
                Step.TENANT_DATA,
                Outcome.WOULD_DELETE,
                f"would delete {sum(rows.values())} rows of the tenant's data"
                f" and {sum(derived_rows.values())} derived rows",
                rows,
                derived_rows,
            ),
            Step.CONFIG_DIRECTORY: (
                StepResult(Step.CONFIG_DIRECTORY, Outcome.WOULD_DELETE, f"would remove {path}")
                if directory is DirectoryState.PRESENT
                else StepResult(
                    Step.CONFIG_DIRECTORY, Outcome.ALREADY_ABSENT, f"{path} does not exist"
                )
            ),
            Step.TENANT_RECORD: StepResult(
                Step.TENANT_RECORD,
                Outcome.WOULD_DELETE,
                "would delete the tenant row and complete the job",
                {"tenants": 1},
            ),
        }
        # Steps an open job already finished are reported as recorded.
        steps = tuple(
            open_job.steps[step]
            if open_job is not None and open_job.finished(step)
            else planned[step]
            for step in Step
        )
        return DeprovisionResult(
            tenant_id=tenant_id,
            job_id=open_job.id if open_job else "",
            state=JobState.VALIDATED,
            validate_only=True,
            steps=steps,
            started_at=open_job.started_at if open_job else None,
        )


def _missing(tenant_id: str, allow_missing: bool, *, validate_only: bool) -> DeprovisionResult:
    if not allow_missing:
        raise NotFound(
            f"tenant {tenant_id} does not exist",
            reason="TENANT_NOT_FOUND",
            metadata={"tenant_id": tenant_id},
        )
    return DeprovisionResult(
        tenant_id=tenant_id,
        job_id="",
        state=JobState.VALIDATED if validate_only else JobState.COMPLETED,
        validate_only=validate_only,
        steps=tuple(
            StepResult(step, Outcome.ALREADY_ABSENT, "the tenant does not exist") for step in Step
        ),
    )

"""Domain errors. The API maps each to an HTTP status and the error body
``{"error": {"code", "message", "param"}}``; the worker stores them on the job."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the service reports to a user."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, param: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details or {}

    def to_body(self) -> dict:
        body = {"code": self.code, "message": self.message, "param": self.param}
        body.update(self.details)
        return {"error": body}


class InvalidRequest(DomainError):
    status_code = 422
    code = "invalid_request"


class ValidationFailed(DomainError):
    """Several problems found at once (the whole spec is validated before any work)."""

    status_code = 422
    code = "validation_failed"

    def __init__(self, problems: list[dict]):
        first = problems[0] if problems else {"param": None, "message": "invalid"}
        msg = "; ".join(f"{p['param']}: {p['message']}" for p in problems)
        super().__init__(msg, param=first.get("param"), details={"problems": problems})


class InvalidFile(DomainError):
    status_code = 422
    code = "invalid_file"


class PayloadTooLarge(DomainError):
    status_code = 413
    code = "payload_too_large"


class Unauthenticated(DomainError):
    status_code = 401
    code = "unauthenticated"


class NotFound(DomainError):
    status_code = 404
    code = "not_found"


class Conflict(DomainError):
    status_code = 409
    code = "conflict"


class BudgetExceeded(DomainError):
    """The job's planned ε does not fit in the dataset's remaining budget."""

    status_code = 409
    code = "budget_exceeded"


class InvalidState(DomainError):
    status_code = 409
    code = "invalid_state"


class ModelUnavailable(DomainError):
    status_code = 422
    code = "model_unavailable"


class JobCancelled(Exception):
    """Raised inside a recipe when the job's cancel flag is seen between steps."""


class LeaseLost(Exception):
    """Raised inside a recipe when another worker has taken over the job."""

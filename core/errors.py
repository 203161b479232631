"""The core's own error tree; no caller outside an adapter or client sees an SDK's errors.

ThreadbridgeError
├── ConfigError               a config file is wrong (names file, key, fix)
├── MessageRejected           a message is not sent to the agent (empty, too long)
├── AgentServiceError         an agent service failed
│   ├── AgentUnavailable      worth retrying: 429, 5xx, connect error, timeout
│   └── AgentRejected         not worth retrying: 4xx, a reply we cannot read
└── PlatformError             posting to a platform failed
    ├── StartupError          a channel cannot start (token refused, platform unreachable)
    ├── PlatformRetryable     try again later (after `retry_after` when given)
    └── PlatformRejected      never retry this post (bot removed, thread gone)
"""

from __future__ import annotations


class ThreadbridgeError(Exception):
    """Base of every error threadbridge raises on purpose."""


class ConfigError(ThreadbridgeError):
    """A configuration file is wrong; the message names the file, the key and the fix."""

    def __init__(self, file: str, key: str, problem: str, fix: str = "") -> None:
        self.file, self.key, self.problem, self.fix = file, key, problem, fix
        text = f"{file}: {key}: {problem}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class StartupError(ThreadbridgeError):
    """A channel cannot start (a refused token, an unreachable platform); says how to fix it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


class MessageRejected(ThreadbridgeError):
    """A message that is not sent to the agent; `reason` is fit to show the user."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class AgentServiceError(ThreadbridgeError):
    """An agent service call failed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class AgentUnavailable(AgentServiceError):
    """The call may succeed later; `retry_after` is the service's own hint in seconds."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status=status)


class AgentRejected(AgentServiceError):
    """The service refused the call; repeating it will not help."""


class PlatformError(ThreadbridgeError):
    """Posting to a platform failed."""


class PlatformRetryable(PlatformError):
    """The post may succeed later; `posted` holds the ids of the parts that did go out."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, posted: list[str] | None = None
    ) -> None:
        self.retry_after = retry_after
        self.posted = posted or []
        super().__init__(message)


class PlatformRejected(PlatformError):
    """The platform will never take this post."""

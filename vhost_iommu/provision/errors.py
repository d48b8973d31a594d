"""The one exception type of the provisioning layer."""


class ProvisionError(RuntimeError):
    """Something needed to obtain QEMU or the guest is missing or failed; the message says what to do."""

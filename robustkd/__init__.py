"""robustkd: robust, faithful knowledge distillation."""

__version__ = "0.1.0"

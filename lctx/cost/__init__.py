"""Serving costs of lctx models: hardware specs, closed-form formulas, compiled-HLO counts."""

"""Stage 6, reporting: the one selection and ranking of runs and its tables (compare), the HTML report
(report), figures (plots) and MLflow (tracking)."""

"""What a reviewer reads: a step's tables, figures and answer, the HTML pages rendered from
an executed notebook, the run's cover page, and their templates."""

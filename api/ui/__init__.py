"""The read-only web dashboard: its Jinja2 templates (``*.html``, beside this file so
that package-data ships them) and its server-side SVG plots."""

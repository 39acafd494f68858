"""Web page templates, shipped inside the package as retracer.web_templates."""

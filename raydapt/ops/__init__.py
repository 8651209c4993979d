"""Operating jobs: submit to a cluster, plan their cost, sweep their keys, compare their runs,
generate the dashboards. May import everything below it (methods, config, recipes, core)."""

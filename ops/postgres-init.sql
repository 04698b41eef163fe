-- The team databases (ops/team.py DATABASES), created on the first start of the postgres
-- container of ops/compose.yaml.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;

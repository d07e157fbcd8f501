"""Sites own their data: studies, instances, results, jobs and calls unique per (site, UID), not per UID; API keys
name their site; failed sign-ins kept per client address (accounts no longer lock)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# (table, uid column, old unique index, new unique constraint)
_OWNED = [("studies", "study_instance_uid", "ix_studies_study_instance_uid", "uq_studies_site_study"),
          ("instances", "sop_instance_uid", "ix_instances_sop_instance_uid", "uq_instances_site_sop"),
          ("scored_images", "sop_instance_uid", "ix_scored_images_sop_instance_uid", "uq_scored_images_site_sop")]


def _add_site(table: str) -> None:
    with op.batch_alter_table(table) as batch:
        batch.add_column(sa.Column("site", sa.String(64), nullable=False, server_default=""))


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("site", sa.String(64), nullable=False, server_default=""))
    op.execute("UPDATE api_keys SET site = substr(name, 1, 64)")
    for table in ("studies", "instances", "scored_images", "jobs", "reviews"):
        _add_site(table)
    # what was received before belongs to the site of the key that sent it
    op.execute("UPDATE studies SET site = coalesce((SELECT api_keys.site FROM api_keys "
               "WHERE api_keys.id = studies.key_id), '')")
    op.execute("UPDATE scored_images SET site = coalesce((SELECT api_keys.site FROM api_keys "
               "WHERE api_keys.id = scored_images.key_id), '')")
    for table in ("instances", "jobs"):  # Study UIDs were unique until now
        op.execute(f"UPDATE {table} SET site = coalesce((SELECT studies.site FROM studies "
                   f"WHERE studies.study_instance_uid = {table}.study_instance_uid), '')")
    op.execute("UPDATE reviews SET site = coalesce((SELECT max(scored_images.site) FROM scored_images "
               "WHERE scored_images.study_instance_uid = reviews.study_instance_uid), '')")
    for table, column, old_index, constraint in _OWNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(old_index)
            batch.create_index(old_index, [column], unique=False)
            batch.create_unique_constraint(constraint, ["site", column])
    with op.batch_alter_table("reviews") as batch:
        batch.drop_constraint("uq_review_study_user", type_="unique")
        batch.create_unique_constraint("uq_reviews_site_study_user", ["site", "study_instance_uid", "user_id"])
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): rebuilding 'users' would break the keys that point at it
    with op.batch_alter_table("users", recreate="never") as batch:
        batch.drop_column("failed_logins")
        batch.drop_column("locked_until")
    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("username_digest", sa.String(64), nullable=False),
    )
    op.create_index("ix_login_failures_at", "login_failures", ["at"])
    op.create_index("ix_login_failures_address_at", "login_failures", ["address", "at"])


def downgrade() -> None:
    op.drop_table("login_failures")
    with op.batch_alter_table("users", recreate="never") as batch:
        batch.add_column(sa.Column("failed_logins", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("reviews") as batch:
        batch.drop_constraint("uq_reviews_site_study_user", type_="unique")
        batch.create_unique_constraint("uq_review_study_user", ["study_instance_uid", "user_id"])
    for table, column, old_index, constraint in _OWNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(constraint, type_="unique")
            batch.drop_index(old_index)
            batch.create_index(old_index, [column], unique=True)
    for table in ("reviews", "jobs", "scored_images", "instances", "studies", "api_keys"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("site")

"""Reports back by C-STORE: the files of each report, and the delivery's state (sent, error, attempts, next due);
usage metered per sender (a key, or a site's DICOM callers, who have no key)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("report_files", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("dimse_sent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("dimse_error", sa.String(256), nullable=False, server_default=""))
        batch.add_column(sa.Column("dimse_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("dimse_next_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_studies_dimse_next_at", ["dimse_next_at"])
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("site", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("meter", sa.String(80), nullable=False, server_default=""))
    op.execute("UPDATE usage SET meter = 'key:' || key_id, site = coalesce((SELECT api_keys.site FROM api_keys "
               "WHERE api_keys.id = usage.key_id), '')")
    with op.batch_alter_table("usage") as batch:
        batch.drop_constraint("uq_usage_day_key", type_="unique")
        batch.create_unique_constraint("uq_usage_day_meter", ["day", "meter"])
        batch.alter_column("key_id", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM usage WHERE key_id IS NULL")
    with op.batch_alter_table("usage") as batch:
        batch.drop_constraint("uq_usage_day_meter", type_="unique")
        batch.create_unique_constraint("uq_usage_day_key", ["day", "key_id"])
        batch.alter_column("key_id", existing_type=sa.Integer(), nullable=False)
        batch.drop_column("meter")
        batch.drop_column("site")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_dimse_next_at")
        for column in ("dimse_next_at", "dimse_attempts", "dimse_error", "dimse_sent_at", "report_files"):
            batch.drop_column(column)

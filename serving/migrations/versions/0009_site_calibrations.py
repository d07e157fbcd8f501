"""Site calibrations: overlays fitted on a site's outcomes (medvision recalibrate), applied by an administrator,
each with who applied or removed it and when

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_calibrations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("overlay", sa.JSON(), nullable=False),
        sa.Column("applied_by", sa.String(128), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_by", sa.String(128), nullable=True),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_site_calibrations_site_artifact", "site_calibrations", ["site", "artifact_sha256"])
    with op.batch_alter_table("scored_images") as batch:
        batch.add_column(sa.Column("calibration_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scored_images") as batch:
        batch.drop_column("calibration_id")
    op.drop_index("ix_site_calibrations_site_artifact", "site_calibrations")
    op.drop_table("site_calibrations")

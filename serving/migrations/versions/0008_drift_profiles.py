"""Drift watch: each scored image's drift quantities (header attributes, input statistics, probability; no
identifiers), compared per site with the artifact's reference

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scored_images") as batch:
        batch.add_column(sa.Column("profile", sa.JSON(), nullable=True))
        batch.create_index("ix_scored_images_site_scored_at", ["site", "scored_at"])


def downgrade() -> None:
    with op.batch_alter_table("scored_images") as batch:
        batch.drop_index("ix_scored_images_site_scored_at")
        batch.drop_column("profile")

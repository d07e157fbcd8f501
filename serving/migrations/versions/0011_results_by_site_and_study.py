"""Results looked up by site and study: each scored image asks whether its study was counted already

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # without it SQLite answers "has this site scored this study?" from the (site, scored_at) index: a walk over every
    # result of the site, on every scored image
    op.create_index("ix_scored_images_site_study", "scored_images", ["site", "study_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_scored_images_site_study", table_name="scored_images")

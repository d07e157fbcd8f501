"""Each scored image records how it was decoded (the resolution plan: 'full', '1/8 wavelet', '1/8 lowpass')

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scored_images") as batch:
        batch.add_column(sa.Column("decode", sa.String(96), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("scored_images") as batch:
        batch.drop_column("decode")

# Emails unique per account (case-insensitive; 0006 cleared duplicates) and invitation links.

import django.db.models.functions.text
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('auth', '0012_alter_user_first_name_max_length'),
        ('tenancy', '0006_emails_and_invitation_links_data'),
    ]

    operations = [
        migrations.AddField(
            model_name='invitation',
            name='token_hash',
            field=models.CharField(editable=False, max_length=64, null=True, unique=True),
        ),
        migrations.AddConstraint(
            model_name='user',
            constraint=models.UniqueConstraint(django.db.models.functions.text.Lower('email'), condition=models.Q(('email', ''), _negated=True), name='one_account_per_email', violation_error_code='email_taken', violation_error_message='An account with this email address exists already.'),
        ),
    ]

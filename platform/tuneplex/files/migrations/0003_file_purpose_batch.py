# The purposes of a batch's files (choices only: no change to the table).

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('files', '0002_alter_file_purpose'),
    ]

    operations = [
        migrations.AlterField(
            model_name='file',
            name='purpose',
            field=models.CharField(choices=[('fine-tune', 'Fine Tune'), ('evals', 'Evals'), ('batch', 'Batch'), ('batch_output', 'Batch Output')], max_length=32),
        ),
    ]
